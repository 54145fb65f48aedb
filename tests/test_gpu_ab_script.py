"""The stage-API GPU A/B script (benchmarks/results/h200/stage-api-ab/gpu_ab.sh), its logic on CPU: every benchmark
process is a stub that records which tree it ran in and writes a report of the benchmark's shape."""

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks/results/h200/stage-api-ab/gpu_ab.sh"

STUB = '''
import json, os, sys
from pathlib import Path
script, args = sys.argv[1], sys.argv[2:]
out = Path(args[args.index("--out") + 1])
out.mkdir(parents=True)
side = "after" if Path("src/open_mythos/inference/stages.py").is_file() else "before"
with open(os.environ["STUB_LOG"], "a") as log:
    log.write(json.dumps([side, script, args]) + "\\n")
rate = {"before": 100.0, "after": 110.0}[side]
if script.endswith("train_step.py"):
    variant = args[args.index("--variants") + 1]
    report = {"results": {"gqa": {variant: {"tokens_per_s": rate}}}}
elif script.endswith("decode.py"):
    rows = {"engine_graphs": {"tokens_per_s": rate, "tokens_equal_generate": 1.0},
            "engine_depth": {"tokens_per_s": 2 * rate, "tokens_equal_generate": 1.0}}
    report = {"results": {"mla": {"batch_1": rows, "batch_16": rows}}}
else:
    report = {"passed": True, "checks": {"moe": {"out": 0.01, "limit": 0.02}}}
(out / (Path(script).stem + ".json")).write_text(json.dumps(report))
'''


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_the_ab_script_alternates_the_trees_and_summarises(tmp_path):
    stub = tmp_path / "stub.py"
    stub.write_text(STUB)
    log = tmp_path / "calls.jsonl"
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PY": f"{sys.executable} {stub}", "STUB_LOG": str(log)}
    done = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    order = [(side, Path(script).name) for side, script, _ in calls]
    assert order[:4] == [("before", "train_step.py"), ("after", "train_step.py"),
                         ("after", "train_step.py"), ("before", "train_step.py")]
    assert sorted(order[4:6]) == [("after", "gpu_check.py"), ("before", "gpu_check.py")]
    assert order[6:] == [("before", "decode.py"), ("after", "decode.py"), ("before", "train_step.py"),
                         ("after", "train_step.py")]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_step_gqa"]["eager"]["after_over_before"] == 1.1
    assert summary["train_step_gqa"]["eager"]["spread_within_side"] == {"before": 0.0, "after": 0.0}
    assert summary["train_step_gqa"]["compiled_step_graph"]["after_over_before"] == 1.1
    assert summary["gpu_check_passed"] == {"before": True, "after": True}
    assert summary["decode_mla"]["engine_depth_batch_16"]["after_over_before"] == 1.1
    assert len(summary["status"]) == 10 and all("rc=0" in s for s in summary["status"])
    with tarfile.open(out / "ab.tar.gz") as tar:
        assert "ab/train_eager_before_1/train_step.json" in tar.getnames()
    assert sorted(p.name for p in out.iterdir()) == ["ab.tar.gz", "summary.json"]


def test_the_ab_script_skips_what_the_budget_cannot_fit(tmp_path):
    stub = tmp_path / "stub.py"
    stub.write_text("import time; time.sleep(30)\n")
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PY": f"{sys.executable} {stub}", "BUDGET_S": "9", "MIN_S": "2"}
    done = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    status = json.loads((out / "summary.json").read_text())["status"]
    assert status[0].startswith("train_eager_before_1 rc=124")  # killed by its timeout
    assert all(s.endswith("skipped: budget") for s in status[1:]) and len(status) == 10

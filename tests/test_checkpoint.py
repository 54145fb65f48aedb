"""Checkpoints never run code from a run directory, and a kill at any point of a save leaves a
checkpoint that resumes (training/checkpoint.py)."""

import io
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

from open_mythos.training.checkpoint import (SafeLoadPlanner, checkpoint_dirs, latest_checkpoint,
                                             read_dcp_metadata)
from open_mythos.training.config import load_config
from open_mythos.training.loop import Trainer
from test_train import ENV, TINY, read_metrics

SRC = str(Path(__file__).resolve().parents[1] / "src")


class RunsCode:
    """Unpickling this calls os.system: it writes ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _train(run_dir: Path, *extra: str, resume: bool = False) -> Trainer:
    cfg = load_config("shakespeare-tiny", overrides=[*TINY, "steps=2", "sweep_loops=[2]", f"out_dir='{run_dir}'",
                                                     *extra])
    trainer = Trainer(cfg, resume=resume, progress=False)
    trainer.train()
    return trainer


def test_resume_refuses_a_hostile_metadata_file_without_running_it(tmp_path):
    run = tmp_path / "run"
    _train(run)
    metadata = latest_checkpoint(run) / "dcp" / ".metadata"
    marker = tmp_path / "marker"
    metadata.write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(ValueError, match=r"\.metadata.*posix\.system"):
        _train(run, resume=True)
    assert not marker.exists()
    # the file is hostile indeed: torch.distributed.checkpoint's own reader runs it
    with warnings.catch_warnings(), pytest.raises(BaseException):  # DCP raises a CheckpointException
        warnings.simplefilter("ignore")
        dcp.load({"x": torch.zeros(1)}, checkpoint_id=str(metadata.parent))
    assert marker.exists()


def test_metadata_reader_reads_what_dcp_writes_and_nothing_else(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.randn(3, 2, dtype=torch.bfloat16), "lr": 0.5, "names": ["a"]}, checkpoint_id=str(tmp_path))
    metadata = read_dcp_metadata(tmp_path / ".metadata")
    assert set(metadata.state_dict_metadata) == {"w", "lr", "names"}
    for damaged in (b"", b"not a pickle", pickle.dumps({"a": 1})[:-3], pickle.dumps([1, 2])):
        (tmp_path / ".metadata").write_bytes(damaged)
        with pytest.raises(ValueError, match=r"\.metadata"):
            read_dcp_metadata(tmp_path / ".metadata")


def test_non_tensor_checkpoint_values_load_without_running_code(tmp_path):
    marker = tmp_path / "marker"
    buf = io.BytesIO()
    torch.save(RunsCode(marker), buf)
    buf.seek(0)
    planner = SafeLoadPlanner()
    planner.flatten_state_dict, planner.state_dict = False, {}
    with pytest.raises(pickle.UnpicklingError):
        planner.load_bytes(SimpleNamespace(dest_index=SimpleNamespace(fqn="x")), buf)
    assert not marker.exists()
    buf = io.BytesIO()
    torch.save({"lr": 0.02, "betas": (0.9, 0.95), "params": [0, 1]}, buf)
    buf.seek(0)
    planner.load_bytes(SimpleNamespace(dest_index=SimpleNamespace(fqn="x")), buf)
    assert planner.state_dict["x"] == {"lr": 0.02, "betas": (0.9, 0.95), "params": [0, 1]}


KILL_AFTER_RENAME = """
import os, pathlib, sys
rename, calls = pathlib.Path.rename, [0]
def killing_rename(self, target):
    out = rename(self, target)
    if self.parent.name == "checkpoints":
        calls[0] += 1
        if calls[0] == int(sys.argv[1]):
            os._exit(137)  # like kill -9: no cleanup, no finally
    return out
pathlib.Path.rename = killing_rename
from open_mythos.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("kill_after", [1, 2], ids=["old-moved-aside", "new-moved-in"])
def test_kill_inside_the_checkpoint_replace_then_resume(tmp_path, kill_after):
    """Re-saving step 2 (a resume of a finished run saves its last step again) renames the old checkpoint
    aside (rename 1), the new one in (rename 2), then deletes the old. Killed right after either rename,
    the run resumes from a complete checkpoint and ends as the uninterrupted run did."""
    args = ["train", "--preset", "shakespeare-tiny", "--no-progress",
            *[a for o in [*TINY, "steps=2", "sweep_loops=[2]"] for a in ("--set", o)]]
    env = {**ENV, "PYTHONPATH": SRC}
    ref, run = tmp_path / "ref", tmp_path / "run"
    for d in (ref, run):
        subprocess.run([sys.executable, "-c", KILL_AFTER_RENAME, "0", *args, "--set", f"out_dir='{d}'"],
                       check=True, env=env, capture_output=True)
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_RENAME, str(kill_after), *args,
                             "--set", f"out_dir='{run}'", "--resume"], env=env, capture_output=True)
    assert killed.returncode == 137
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    if kill_after == 1:  # the window of the old code's rmtree-then-rename: no step_00000002 at all
        assert names == ["step_00000002.old", "step_00000002.tmp"]
    else:
        assert names == ["step_00000002", "step_00000002.old"]
    assert latest_checkpoint(run).name.startswith("step_00000002")
    subprocess.run([sys.executable, "-c", KILL_AFTER_RENAME, "0", *args, "--set", f"out_dir='{run}'", "--resume"],
                   check=True, env=env, capture_output=True)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000002"]
    assert _same_records(read_metrics(run), read_metrics(ref))
    for name in ("model/model.safetensors", "checkpoints/step_00000002/model.safetensors"):
        a, b = load_file(str(run / name)), load_file(str(ref / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _same_records(a: list[dict], b: list[dict]) -> bool:
    """Metrics records equal but for the wall-clock fields."""
    clock = ("tokens_per_s", "tokens_per_s_per_gpu", "mfu")
    return [{k: v for k, v in r.items() if k not in clock} for r in a] == \
        [{k: v for k, v in r.items() if k not in clock} for r in b]


def test_incomplete_checkpoints_are_never_the_latest(tmp_path):
    run = tmp_path / "run"
    _train(run, "ckpt_every=1", "keep_last=3")
    assert [p.name for p in checkpoint_dirs(run)] == ["step_00000001", "step_00000002"]
    # what the old rmtree-then-rename left when killed: step_N without its dcp/
    broken = run / "checkpoints" / "step_00000003"
    broken.mkdir()
    (broken / "trainer_state.json").write_text('{"step": 3}')
    assert latest_checkpoint(run).name == "step_00000002"
    (latest_checkpoint(run) / "dcp" / ".metadata").unlink()
    assert latest_checkpoint(run).name == "step_00000001"

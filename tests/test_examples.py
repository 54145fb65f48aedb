"""Every example in examples/ runs (CPU, seconds) and prints what it promises."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
EXPECT = {
    "quickstart.py": "identical logits",
    "variants.py": "mythos_1t",
    "moe_lora_demo.py": "reuses adapter 3",
    "train_tiny.py": "held-out loss",
    "generate.py": "loops per token",
    "serve_client.py": "chat (streamed)",
}


def test_every_example_is_covered():
    assert {p.name for p in EXAMPLES.glob("*.py")} == set(EXPECT)


@pytest.mark.parametrize("name", sorted(EXPECT))
def test_example_runs(name):
    args = ["5"] if name == "train_tiny.py" else []
    out = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert EXPECT[name] in out.stdout

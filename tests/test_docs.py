"""Python blocks of the docs run as written (in a scratch directory)."""

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.mark.parametrize("name", ["datasets.md", "evaluation.md"])
def test_doc_python_blocks_run(name, tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", (DOCS / name).read_text(), flags=re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        if "runs/shakespeare-tiny/model" in block:  # needs a trained run: tests/test_hf.py covers this API
            continue
        exec(compile(block, name, "exec"), {})

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from open_mythos import MythosConfig


def tiny_config(attn_type: str = "gqa", **overrides) -> MythosConfig:
    """A model small enough for a 2-core CPU: every component present, all sizes tiny."""
    base = dict(vocab_size=97, dim=64, n_heads=4, n_kv_heads=2, max_seq_len=64, max_loop_iters=3,
                prelude_layers=1, coda_layers=1, attn_type=attn_type, kv_lora_rank=32, q_lora_rank=48,
                qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, n_experts=8, n_shared_experts=1,
                n_experts_per_tok=2, expert_dim=32, lora_rank=4, max_output_tokens=32)
    base.update(overrides)
    return MythosConfig(**base)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def import_benchmark(name: str, monkeypatch):
    """benchmarks/<name>.py as a module (its directory on sys.path for ``common``), for this test only."""
    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(bench))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", bench / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, f"bench_{name}", module)
    spec.loader.exec_module(module)
    return module

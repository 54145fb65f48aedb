"""The seed documents' snippets run unchanged."""

import pytest
import torch


@pytest.mark.parametrize("attn_type", ["mla", "gqa"])
def test_seed_quickstart_runs_unchanged(attn_type):
    from open_mythos.main import OpenMythos, MythosConfig

    cfg = MythosConfig(
        vocab_size=1000,
        dim=256,
        n_heads=8,
        max_seq_len=128,
        max_loop_iters=4,
        prelude_layers=1,
        coda_layers=1,
        n_experts=8,
        n_shared_experts=1,
        n_experts_per_tok=2,
        expert_dim=64,
        attn_type=attn_type,
    )
    model = OpenMythos(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    logits = model(ids, n_loops=4)
    out = model.generate(ids, max_new_tokens=8, n_loops=8)
    assert logits.shape == (2, 16, 1000)
    assert out.shape == (2, 24) and torch.equal(out[:, :16], ids)
    assert torch.isfinite(logits).all()


def test_seed_variant_imports_and_spectral_radius():
    from open_mythos import mythos_1b, mythos_3b, mythos_10b, mythos_50b, mythos_100b, mythos_500b, mythos_1t
    from open_mythos.main import OpenMythos, MythosConfig

    assert all(callable(f) for f in (mythos_1b, mythos_3b, mythos_10b, mythos_50b, mythos_100b, mythos_500b, mythos_1t))
    model = OpenMythos(MythosConfig(vocab_size=100, dim=64, n_heads=4, max_seq_len=32, max_loop_iters=2,
                                    n_experts=4, expert_dim=16, n_experts_per_tok=2, kv_lora_rank=16,
                                    q_lora_rank=0, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8))
    A = model.recurrent.injection.get_A()
    assert A.shape == (64,)
    rho = torch.linalg.eigvals(torch.diag(A)).abs().max().item()
    assert rho < 1.0 and rho == pytest.approx(model.recurrent.injection.spectral_radius())


# seed table: variant -> (dim, experts, expert dim, loops, context, max output)
SEED_TABLE = {
    "mythos_1b": (2048, 64, 2048, 16, 4096, 4096),
    "mythos_3b": (3072, 64, 4096, 16, 4096, 4096),
    "mythos_10b": (4096, 128, 5632, 24, 8192, 4096),
    "mythos_50b": (6144, 256, 9728, 32, 8192, 4096),
    "mythos_100b": (8192, 256, 13568, 32, 1 << 20, 131072),
    "mythos_500b": (12288, 512, 23040, 48, 1 << 20, 131072),
    "mythos_1t": (16384, 512, 34560, 64, 1 << 20, 131072),
}


@pytest.mark.parametrize("name", list(SEED_TABLE))
def test_variants_match_seed_table_and_counts(name):
    from open_mythos import VARIANTS, count_parameters

    cfg = VARIANTS[name]()
    assert (cfg.dim, cfg.n_experts, cfg.expert_dim, cfg.max_loop_iters, cfg.max_seq_len,
            cfg.max_output_tokens) == SEED_TABLE[name]
    counts = count_parameters(cfg)
    assert 0 < counts["active"] < counts["total"]
    # the name is the scale: total within a factor 2 of the nominal size
    nominal = {"b": 1e9, "t": 1e12}[name[-1]] * float(name.split("_")[1][:-1])
    assert nominal / 2 < counts["total"] < nominal * 2


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    """Every ```python block of the README, in order, in one namespace (as a reader would paste them)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        if "localhost:8000" in block:  # needs `mythos serve` running: covered by tests/test_serve.py
            continue
        exec(compile(block, "README.md", "exec"), namespace)

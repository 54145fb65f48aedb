"""The model's stage API: the forward built from stages is, bit for bit on a CPU, the forward as it was
written before the stages existed (frozen below as a naive reference over the model's own modules)."""

import pytest
import torch

from open_mythos import KVCache, OpenMythos
from open_mythos.layers import rope_angles, sinusoid

from conftest import tiny_config


def frozen_loop_embeddings(n: int, dim: int, scale: float, dtype: torch.dtype) -> torch.Tensor:
    width = max(2, dim // 8)
    emb = scale * sinusoid(torch.arange(n), width)
    return torch.nn.functional.pad(emb, (0, dim - width)).to(dtype)


def frozen_forward(model: OpenMythos, ids: torch.Tensor, n_loops: int, cache: KVCache | None = None,
                   backprop_loops: int | None = None, logits_at: torch.Tensor | None = None):
    """OpenMythos.forward + RecurrentBlock.forward as they were before the stage API (commit a2858ac)."""
    cfg, rec = model.cfg, model.recurrent
    start = cache.pos if cache is not None else 0
    T = ids.shape[1]
    rope = rope_angles(torch.arange(start, start + T), cfg.rope_dim, cfg.rope_theta)
    x = model.embed(ids)
    for i, block in enumerate(model.prelude):
        x = block(x, rope, cache, ("prelude", i))
    e = x
    h = torch.zeros_like(e)
    cum = torch.zeros(e.shape[:-1], dtype=torch.float32)
    depth = torch.zeros_like(cum)
    mixture = torch.zeros_like(e, dtype=torch.float32) if cfg.loop_output == "act" else None
    first_grad_loop = 0 if backprop_loops is None else max(0, n_loops - backprop_loops)
    last = cfg.max_loop_iters - 1
    embs = frozen_loop_embeddings(min(n_loops, last + 1), cfg.dim, cfg.loop_embed_scale, e.dtype)
    for t in range(n_loops):
        emb = embs[min(t, last)]
        lora = (rec.lora.down[min(t, last)], rec.lora.up[min(t, last)]) if rec.lora is not None else None
        with torch.set_grad_enabled(torch.is_grad_enabled() and t >= first_grad_loop):
            xt = h + e + emb
            out = rec.block.residual(xt, rope, cache, cache.loop_key(t) if cache is not None else None)
            if lora is not None:
                out = out + (rec.lora.norm(xt) @ lora[0].mT) @ lora[1].mT
            h = rec.injection(h, e, out)
        depth = depth + (cum < rec.act.threshold).float()
        running = cum < rec.act.threshold
        if t == n_loops - 1:
            weight = torch.where(running, 1.0 - cum, torch.zeros_like(cum))
        else:
            hp = h if mixture is not None else h.detach()
            p = torch.sigmoid(rec.act.proj(hp).squeeze(-1).float())
            halts_now = running & (cum + p >= rec.act.threshold)
            weight = torch.where(halts_now, 1.0 - cum, torch.where(running, p, torch.zeros_like(p)))
        cum = cum + weight
        if mixture is not None:
            mixture = mixture + weight.unsqueeze(-1) * h.float()
    h = rec.out_norm(h if mixture is None else mixture.to(e.dtype))
    for i, block in enumerate(model.coda):
        h = block(h, rope, cache, ("coda", i))
    if logits_at is not None:
        h = h[torch.arange(h.shape[0]), logits_at]
    logits = model.head(model.norm(h))
    if cache is not None:
        cache.advance(T)
    return logits, depth


def _model(attn: str, loop_output: str, lora_rank: int = 4) -> OpenMythos:
    torch.manual_seed(0)
    model = OpenMythos(tiny_config(attn, loop_output=loop_output, lora_rank=lora_rank))
    with torch.no_grad():  # non-trivial LoRA up-projections and halting unit
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(std=0.05)
        model.recurrent.act.proj.weight.normal_(std=0.5)
    return model


@pytest.mark.parametrize("attn", ["gqa", "mla"])
@pytest.mark.parametrize("loop_output", ["final", "act"])
@pytest.mark.parametrize("lora_rank", [0, 4])
def test_forward_from_stages_equals_the_frozen_forward_bit_for_bit(attn, loop_output, lora_rank):
    model = _model(attn, loop_output, lora_rank).eval()
    ids = torch.randint(0, 97, (2, 9))
    L = model.cfg.max_loop_iters
    for n in (1, 2, L, L + 3):  # past max_loop_iters: the clamped index
        with torch.no_grad():
            logits, depth = model(ids, n, return_act_depth=True)
            ref, ref_depth = frozen_forward(model, ids, n)
        assert torch.equal(logits, ref), n
        assert torch.equal(depth, ref_depth), n
    at = torch.tensor([3, 8])
    with torch.no_grad():
        assert torch.equal(model(ids, 3, logits_at=at), frozen_forward(model, ids, 3, logits_at=at)[0])


@pytest.mark.parametrize("attn", ["gqa", "mla"])
def test_cached_decoding_from_stages_equals_the_frozen_forward_bit_for_bit(attn):
    model = _model(attn, "final").eval()
    ids = torch.randint(0, 97, (2, 7))
    caches = KVCache(2, 16), KVCache(2, 16)
    with torch.no_grad():
        for chunk in (ids[:, :5], ids[:, 5:6], ids[:, 6:]):
            assert torch.equal(model(chunk, 5, caches[0]), frozen_forward(model, chunk, 5, caches[1])[0])


def test_gradients_from_stages_equal_the_frozen_forward_bit_for_bit():
    model = _model("gqa", "act").train()
    ids = torch.randint(0, 97, (2, 8))
    grads = []
    for forward in (lambda: model(ids, 5, backprop_loops=3), lambda: frozen_forward(model, ids, 5, None, 3)[0]):
        model.zero_grad()
        forward().square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.equal(grads[0][n], grads[1][n]), n


def test_stages_compose_into_the_forward():
    """rope -> embed_prelude -> iterate (per-row loop indices) -> readout -> coda_logits, driven by hand as the
    inference engine drives it, gives the forward's logits (final state; rows at different loop indices)."""
    model = _model("mla", "final").eval()
    ids = torch.randint(0, 97, (3, 6))
    n = model.cfg.max_loop_iters + 2
    with torch.no_grad():
        rope = model.rope(torch.arange(6))
        e = model.embed_prelude(ids, rope)
        h = torch.zeros_like(e)
        for t in range(n):
            h = model.iterate(h, e, torch.full((3,), t), rope)  # one index per row (here all equal)
        logits = model.coda_logits(model.readout(h), rope)
        torch.testing.assert_close(logits, model(ids, n), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_row_loop_indices_read_the_learned_table_and_clamp(dtype):
    """iterate with one loop index per row (the engine's call) equals each row's own int-index call for a trained
    loop table and Parcae injection, rows past max_loop_iters reading the last row of the table."""
    model = OpenMythos(tiny_config(injection="parcae", loop_embed="learned", sandwich_norm=True, lora_rank=0)).eval()
    with torch.no_grad():  # no LoRA: the table is the only thing that depends on the loop index
        model.recurrent.loop_embed.normal_()
        model.recurrent.injection.B.add_(torch.randn_like(model.recurrent.injection.B) * 0.1)
    model.to(dtype)
    rope = model.rope(torch.arange(5))
    h, e = torch.randn(4, 5, model.cfg.dim, dtype=dtype), torch.randn(4, 5, model.cfg.dim, dtype=dtype)
    t = torch.tensor([0, 1, model.cfg.max_loop_iters - 1, model.cfg.max_loop_iters + 4])
    with torch.no_grad():
        rows = model.iterate(h, e, t, rope)
        for i, ti in enumerate(t.tolist()):
            torch.testing.assert_close(rows[i:i + 1], model.iterate(h[i:i + 1], e[i:i + 1], ti, rope))
        assert not torch.allclose(rows[3:], model.iterate(h[3:], e[3:], 0, rope))  # the table is read, not row 0
        last = torch.tensor([model.cfg.max_loop_iters - 1])
        torch.testing.assert_close(rows[3:], model.iterate(h[3:], e[3:], last, rope))  # clamped to the last row

"""Sliding-window attention (`MythosConfig.attn_window`): equal to a naive softmax over the window, in the
full forward, the cached decode and the inference engine."""

import pytest
import torch

from open_mythos import KVCache, OpenMythos
from open_mythos.attention import attend
from open_mythos.inference import Engine, Request
from open_mythos.sampling import SamplingParams

from conftest import tiny_config

TOL = dict(rtol=1e-4, atol=1e-4)


def naive_attention(q, k, v, positions, window):
    """Loop over queries: softmax(q k^T / sqrt(d)) v over keys j with positions[i] - window < j <= positions[i]."""
    B, T, H, d = q.shape
    rep = H // k.shape[2]
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    out = torch.zeros(B, T, H, v.shape[-1])
    for b in range(B):
        for i in range(T):
            p = int(positions[b, i])
            lo = max(0, p - window + 1) if window else 0
            scores = torch.einsum("hd,shd->hs", q[b, i], k[b, lo:p + 1]) / d ** 0.5
            out[b, i] = torch.einsum("hs,shd->hd", scores.softmax(-1), v[b, lo:p + 1])
    return out


@pytest.mark.parametrize("window", [1, 3, 20])
@pytest.mark.parametrize("start", [0, 5])
def test_attend_with_window_equals_naive_softmax_over_the_window(window, start):
    T = 7
    q, k, v = torch.randn(2, T, 4, 8), torch.randn(2, start + T, 2, 8), torch.randn(2, start + T, 2, 8)
    positions = torch.arange(start, start + T).expand(2, T)
    torch.testing.assert_close(attend(q, k, v, start, window=window), naive_attention(q, k, v, positions, window),
                               **TOL)


def test_attend_with_window_and_an_engine_mask_uses_each_rows_own_position():
    """The engine's rows decode one token each at different positions of one static buffer."""
    S, positions = 12, torch.tensor([[3], [9]])
    q, k, v = torch.randn(2, 1, 4, 8), torch.randn(2, S, 2, 8), torch.randn(2, S, 2, 8)
    mask = (torch.arange(S) <= positions)[:, None, None, :]
    torch.testing.assert_close(attend(q, k, v, 0, mask=mask, window=4), naive_attention(q, k, v, positions, 4),
                               **TOL)


@pytest.mark.parametrize("attn_type", ["gqa", "mla"])
def test_window_bounds_the_receptive_field_and_decode_equals_full_forward(attn_type):
    cfg = tiny_config(attn_type, attn_window=2)
    model = OpenMythos(cfg).eval()
    ids = torch.randint(0, 97, (2, 14))
    n_loops = 3
    with torch.no_grad():
        full = model(ids, n_loops)
        cache = KVCache(2, 14)
        steps = [model(ids[:, :6], n_loops, cache)] + [model(ids[:, t:t + 1], n_loops, cache) for t in range(6, 14)]
        torch.testing.assert_close(torch.cat(steps, dim=1), full, **TOL)
    # each layer application reaches one position further back: prelude + 3 loops + coda = 5 positions. Which input
    # positions an output depends on, from the gradient (masked keys get exactly zero weight, hence zero gradient)
    reach = cfg.prelude_layers + n_loops + cfg.coda_layers
    embedded = {}
    hook = model.embed.register_forward_hook(lambda module, args, out: embedded.setdefault("x", out.requires_grad_()))
    try:
        out = model(ids, n_loops)
    finally:
        hook.remove()
    for p in range(ids.shape[1]):
        (grad,) = torch.autograd.grad(out[:, p].sum(), embedded["x"], retain_graph=True)
        seen = (grad.abs().sum(-1) > 0)[0].nonzero().flatten().tolist()
        assert seen == list(range(max(0, p - reach), p + 1)), (p, seen)


def test_engine_with_window_equals_model_generate():
    model = OpenMythos(tiny_config("gqa", attn_window=3)).eval()
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
    greedy = SamplingParams(temperature=0.0)
    ref = [model.generate(torch.tensor([p]), 8, 2, temperature=0)[0, len(p):].tolist() for p in prompts]
    out = Engine(model, max_batch=2).run([Request(p, 8, 2, greedy) for p in prompts])
    assert [c.tokens for c in out] == ref


def test_attn_window_is_validated():
    with pytest.raises(ValueError, match="attn_window"):
        tiny_config(attn_window=0)

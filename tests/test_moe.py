"""The grouped-matmul MoE against a naive per-expert loop, and aux-loss-free balancing."""

import pytest
import torch
import torch.nn.functional as F

from open_mythos import moe as moe_module
from open_mythos.moe import MoE, topk_by_rank

from conftest import import_benchmark, tiny_config


def naive_moe(m: MoE, x: torch.Tensor) -> torch.Tensor:
    """Obviously-correct reference: route, then loop over tokens and their chosen experts."""
    flat = x.reshape(-1, x.shape[-1])
    scores = torch.sigmoid(flat @ m.router.weight.T)
    ids = torch.topk(scores + m.router_bias, m.top_k, dim=-1).indices
    out = torch.zeros_like(flat)
    for n in range(flat.shape[0]):
        gates = scores[n, ids[n]] / scores[n, ids[n]].sum()
        for slot in range(m.top_k):
            e = ids[n, slot]
            hidden = F.silu(m.w1[e] @ flat[n]) * (m.w3[e] @ flat[n])
            out[n] = out[n] + gates[slot] * (m.w2[e] @ hidden)
    if m.shared is not None:
        out = out + m.shared(flat)
    return out.view_as(x)


def _grads(m, x, fn):
    m.zero_grad()
    x = x.clone().requires_grad_(True)
    y = fn(m, x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in m.named_parameters()}


def _assert_matches_naive(m, x, fn):
    """Output, input gradient and every parameter gradient of fn(m, x) equal the naive loop's."""
    y, gx, gp = _grads(m, x, fn)
    y_ref, gx_ref, gp_ref = _grads(m, x, naive_moe)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)
    for name in gp:
        torch.testing.assert_close(gp[name], gp_ref[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("path", ["grouped_mm", "padded_bmm", "gathered_weights"])
def test_moe_matches_naive_loop_values_and_grads(path, monkeypatch):
    monkeypatch.setattr(moe_module, "_grouped_mm_available", lambda: path == "grouped_mm")
    m = MoE(tiny_config())
    m.gather_max_assignments = 10**6 if path == "gathered_weights" else 0
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.2)
    m.router_bias.normal_(std=0.3)
    _assert_matches_naive(m, torch.randn(3, 7, 64), lambda mod, inp: mod(inp))


@pytest.mark.parametrize("dim,expert_dim", [(66, 32), (64, 30), (68, 34)])
def test_moe_with_rows_grouped_mm_cannot_take_matches_naive_loop(dim, expert_dim):
    """grouped_mm needs 16-byte rows (fp32: dim and expert_dim multiples of 4); other widths take the padded
    bmm instead of failing with "strides should be multiple of 16 bytes"."""
    m = MoE(tiny_config(dim=dim, expert_dim=expert_dim, n_heads=1, n_kv_heads=1))
    m.gather_max_assignments = 0
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.2)
    _assert_matches_naive(m, torch.randn(3, 7, dim), lambda mod, inp: mod(inp))


def test_topk_by_rank_matches_topk_and_breaks_ties_to_the_lower_index():
    scores = torch.rand(50, 64)
    assert torch.equal(topk_by_rank(scores, 4), torch.topk(scores, 4).indices)
    tied = torch.tensor([[0.5, 0.9, 0.5, 0.9, 0.1]])
    assert topk_by_rank(tied, 3).tolist() == [[1, 3, 0]]


@torch.no_grad()
def test_compiled_decoding_moe_matches_naive_loop():
    """One or a few tokens under torch.compile: rank top-k and the gathered experts as matvec reductions."""
    m = MoE(tiny_config()).eval()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.2)
    m.router_bias.normal_(std=0.3)
    compiled = torch.compile(m, dynamic=False)
    for tokens in (1, 1, 3):
        x = torch.randn(tokens, 1, 64)
        torch.testing.assert_close(compiled(x), naive_moe(m, x), rtol=1e-5, atol=1e-5)


def test_compiled_training_moe_matches_naive_loop():
    """A training batch under torch.compile: narrow sort keys, grouped experts."""
    m = MoE(tiny_config())
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.2)
    m.router_bias.normal_(std=0.3)
    try:
        _assert_matches_naive(m, torch.randn(4, 9, 64), torch.compile(lambda mod, inp: mod(inp), dynamic=False))
    finally:  # its graph-break resume frames are shared with later compiles: do not let them recompile as dynamic
        torch._dynamo.reset()


def test_router_bias_changes_selection_not_gates():
    m = MoE(tiny_config())
    x = torch.randn(16, 64)
    ids0, gates0 = m.route(x)
    m.router_bias[ids0[0, 0]] = -10.0  # forbid token 0's favourite expert
    ids1, gates1 = m.route(x)
    assert ids0[0, 0] not in ids1[0]
    scores = torch.sigmoid(x @ m.router.weight.T)
    expected = scores.gather(-1, ids1)
    torch.testing.assert_close(gates1, expected / expected.sum(-1, keepdim=True))


def test_routing_bias_and_load_stay_fp32_when_the_model_is_cast():
    """model.to(bf16) (from_pretrained(dtype=...), serving) keeps the routing bias's fp32 values, so the cast model
    picks the experts the fp32 model picks; bf16 would round 1.0011 to 1.0 and 0.3712 to 0.3711."""
    from open_mythos.model import OpenMythos
    model = OpenMythos(tiny_config())
    bias = torch.tensor([0.3712, -0.001, 1.0011, 0.5, 0.25, -0.75, 0.125, 2.0009])[: model.cfg.n_experts]
    for m in model.moe_layers():
        m.router_bias.copy_(bias)
    model.to(torch.bfloat16)
    for m in model.moe_layers():
        assert m.w1.dtype == torch.bfloat16
        assert m.router_bias.dtype == m.expert_load.dtype == torch.float32
        assert torch.equal(m.router_bias, bias)
    x = torch.randn(32, model.cfg.dim)
    m = model.moe_layers()[0]
    expected = torch.topk(torch.sigmoid(F.linear(x.bfloat16(), m.router.weight).float()) + bias, m.top_k).indices
    assert torch.equal(m.route(x.bfloat16())[0].sort(-1).values, expected.sort(-1).values)
    model.to("meta").to_empty(device="cpu")  # meta-device construction (transformers, FSDP) still works
    assert model.moe_layers()[0].router_bias.dtype == torch.float32


def test_skewed_router_becomes_balanced():
    cfg = tiny_config(n_experts=8, n_experts_per_tok=2)
    m = MoE(cfg).train()
    with torch.no_grad():  # skew: every token prefers experts 0 and 1
        m.router.weight.normal_(std=0.02)
        m.router.weight[:2] += 0.5 * torch.ones(64) / 8

    def batch():
        return torch.randn(512, 64) + 1.0

    def imbalance():  # max load / mean load over fresh batches; 1.0 = perfectly balanced
        m.expert_load.zero_()
        with torch.no_grad():
            for _ in range(4):
                m(batch())
        load = m.update_router_bias(rate=0.0)
        return (load.max() / load.mean()).item()

    before = imbalance()
    for step in range(600):  # training-like: a new batch per step, bias updated after each
        with torch.no_grad():
            m(batch())
        m.update_router_bias(rate=0.002 if step < 300 else 0.0005)
    after = imbalance()
    assert before > 3.0, before
    assert after < 1.25, after


def test_load_is_counted_only_in_training():
    m = MoE(tiny_config()).eval()
    m(torch.randn(10, 64))
    assert m.expert_load.sum() == 0
    m.train()(torch.randn(10, 64))
    assert m.expert_load.sum() == 10 * m.top_k


def test_dense_bound_equals_the_moe_when_every_token_picks_the_first_experts(monkeypatch):
    """benchmarks/moe.py's dense bound (the speed ceiling the training benchmark reports) computes the MoE
    exactly when routing sends every token to experts 0..k-1: the same FLOPs, only the dispatch removed."""
    bench_moe = import_benchmark("moe", monkeypatch)

    m = MoE(tiny_config())
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.1)
    m.router_bias[: m.top_k] = 100.0  # selection only: every token picks experts 0..k-1, gates unchanged
    route = m.route

    def route_in_id_order(u):  # the bound gates slot j with expert j's gate: hand it the experts in id order
        ids, gates = route(u)
        ids, order = ids.sort(-1)
        return ids, gates.gather(-1, order)

    monkeypatch.setattr(m, "route", route_in_id_order)
    x = torch.randn(3, 5, 64)
    y_bound, gx_bound, gp_bound = _grads(m, x, bench_moe.dense_bound_moe)
    y, gx, gp = _grads(m, x, lambda mod, t: mod(t))
    torch.testing.assert_close(y_bound, y)
    torch.testing.assert_close(gx_bound, gx)
    for name in ("w1", "w2", "w3", "router.weight"):
        torch.testing.assert_close(gp_bound[name], gp[name])


def test_gates_stay_finite_where_every_chosen_score_underflows():
    """Router logits below ~-104 give sigmoid scores of exactly 0 in fp32; the gates are still s_i / sum_j s_j of the
    exact scores (computed here in fp64), not 0/0 = NaN (found by the config property test at init_std = 102)."""
    moe = MoE(tiny_config(n_experts=4, n_experts_per_tok=2))
    dim = moe.router.weight.shape[1]
    logits = torch.tensor([-200.0, -300.0, -200.5, -250.0])
    with torch.no_grad():
        for p in moe.parameters():
            torch.nn.init.normal_(p, std=0.2)
        moe.router.weight.copy_(logits[:, None].expand(4, dim) / dim)
    x = torch.ones(3, dim)
    ids, gates = moe.route(x)
    exact = torch.sigmoid(logits.double())[ids]
    torch.testing.assert_close(gates.double(), exact / exact.sum(-1, keepdim=True))
    assert torch.isfinite(moe(x)).all()

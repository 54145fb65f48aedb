"""LTI injection stability, ACT halting semantics, depth-wise LoRA and truncated backprop."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from open_mythos import OpenMythos
from open_mythos.layers import rope_angles
from open_mythos.recurrence import ACTHalting, LTIInjection, act_depth, loop_embeddings
from open_mythos.training.speed import LoopRunner

from conftest import tiny_config


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_spectral_radius_below_one_for_random_and_extreme_parameters(dtype):
    inj = LTIInjection(256)
    settings = [(torch.randn(256) * s, torch.randn(1) * s) for s in (0.1, 1.0, 10.0)]
    settings += [(torch.full((256,), v), torch.tensor([w])) for v in (-80.0, -30.0, 0.0, 30.0, 80.0)
                 for w in (-80.0, -20.0, 0.0, 20.0)]
    for log_A, log_dt in settings:
        with torch.no_grad():
            inj.log_A.copy_(log_A)
            inj.log_dt.copy_(log_dt)
        A = inj.get_A(dtype)
        assert A.dtype == dtype
        rho = torch.linalg.eigvals(torch.diag(A.float())).abs().max().item()
        assert 0.0 <= rho < 1.0, (log_A[0].item(), log_dt.item(), rho)
    inj_bf16 = LTIInjection(8).to(torch.bfloat16)
    with torch.no_grad():
        inj_bf16.log_A.fill_(-60.0)
    assert inj_bf16.get_A().max().item() < 1.0


def test_injection_is_the_update_rule():
    inj = LTIInjection(16)
    h, e, out = torch.randn(3, 16), torch.randn(3, 16), torch.randn(3, 16)
    dt = torch.exp(inj.log_dt)
    A = torch.exp(-dt * torch.exp(inj.log_A)) * (1 - torch.finfo(torch.float32).eps / 2)
    torch.testing.assert_close(inj(h, e, out), A * h + dt * inj.B * e + out)


def test_act_weight_with_a_per_position_last_mask_equals_the_scalar_rule():
    """The engine's per-token budgets pass ``last`` as a mask: each position gets the weight the scalar rule
    gives it (True: the remainder; False: p, or the remainder once cum + p reaches the threshold)."""
    act = ACTHalting(8, threshold=0.9)
    cum = torch.tensor([0.0, 0.5, 0.95, 0.2, 0.6, 0.0])
    p = torch.tensor([0.3, 0.5, 0.4, 0.1, 0.1, 0.95])
    last = torch.tensor([True, False, True, False, True, False])
    w = act.weight(p, cum, last)
    for i in range(6):
        one = act.weight(p[i: i + 1], cum[i: i + 1], bool(last[i]))
        assert torch.equal(w[i: i + 1], one)
    assert torch.equal(act.weight(None, cum, True), act.weight(p, cum, torch.ones(6, dtype=torch.bool)))


def test_act_weights_sum_to_one_with_remainder():
    act = ACTHalting(8, threshold=0.99)
    probs = [0.5, 0.3, 0.4, 0.9]  # cum: 0.5, 0.8, then 0.8 + 0.4 >= 0.99 -> remainder 0.2
    cum = torch.zeros(1)
    weights = []
    for t in range(4):
        w = act.weight(torch.full((1,), probs[t]), cum, last=t == 3)
        cum = cum + w
        weights.append(w.item())
    assert weights == pytest.approx([0.5, 0.3, 0.2, 0.0])


PROBS = st.one_of(st.sampled_from([0.0, 0.125, 0.25, 0.5, 0.75, 1.0]), st.floats(0.0, 1.0, width=32))


@given(st.integers(1, 6).flatmap(lambda D: st.lists(st.lists(PROBS, min_size=D, max_size=D), min_size=1, max_size=5)),
       st.one_of(st.sampled_from([0.25, 0.5, 0.75, 0.99, 1.0]), st.floats(0.0625, 1.0, width=32)))
@settings(max_examples=200, deadline=None)
def test_act_depth_is_the_recurrent_blocks_halting_depth(probs, threshold):
    """act_depth over p_1..p_D equals a loop-by-loop fp32 reference (first d with p_1 + ... + p_d >= threshold,
    else D; exact ties included: the dyadic values sum exactly) and the depth the recurrent block's own ACT
    bookkeeping (``halt``) counts when its halting unit returns these probabilities."""
    p = torch.tensor(probs, dtype=torch.float32).T  # (D, positions)
    D = p.shape[0]
    reference = []
    for column in p.T:
        total, depth = torch.zeros((), dtype=torch.float32), D
        for d in range(D):
            total = total + column[d]
            if total >= threshold:
                depth = d + 1
                break
        reference.append(depth)
    assert act_depth(p, threshold).tolist() == reference
    block = OpenMythos(tiny_config(act_threshold=threshold)).recurrent
    h = torch.zeros(p.shape[1], block.cfg.dim)
    cum, depth = torch.zeros(p.shape[1]), torch.zeros(p.shape[1])
    for t in range(D):
        block.act.halting_prob = lambda _, t=t: p[t]
        cum, depth, _ = block.halt(h, cum, depth, None, is_last=t == D - 1)
    assert depth.long().tolist() == reference


@pytest.mark.parametrize("loop_output", ["act", "final"])
def test_act_weights_sum_to_one_in_the_model(loop_output):
    model = OpenMythos(tiny_config(loop_output=loop_output))
    with torch.no_grad():
        model.recurrent.act.proj.weight.normal_(std=0.5)
    act, cum = model.recurrent.act, torch.zeros(2, 5)
    total = torch.zeros(2, 5)
    for t in range(6):
        w = act.weight(act.halting_prob(torch.randn(2, 5, 64)), cum, last=t == 5)
        cum = cum + w
        assert (w >= 0).all()
        total += w
    torch.testing.assert_close(total, torch.ones(2, 5))
    logits, depth = model(torch.randint(0, 97, (2, 5)), 6, return_act_depth=True)
    assert ((depth >= 1) & (depth <= 6)).all()


def test_final_and_act_outputs_differ_and_both_are_finite():
    ids = torch.randint(0, 97, (2, 8))
    torch.manual_seed(1)
    final = OpenMythos(tiny_config(loop_output="final"))
    act = OpenMythos(tiny_config(loop_output="act"))
    act.load_state_dict(final.state_dict())
    a, b = final(ids, 4), act(ids, 4)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert not torch.allclose(a, b)


def test_depth_lora_clamps_beyond_trained_loops():
    model = OpenMythos(tiny_config(max_loop_iters=3))
    lora = model.recurrent.lora
    with torch.no_grad():
        lora.up.normal_()
    x = torch.randn(2, 4, 64)
    torch.testing.assert_close(lora(x, 7), lora(x, 2))
    assert not torch.allclose(lora(x, 0), lora(x, 2))


def test_truncated_backprop_leaves_early_loops_without_graph():
    model = OpenMythos(tiny_config())
    ids = torch.randint(0, 97, (2, 6))
    full = model(ids, 4)
    truncated = model(ids, 4, backprop_loops=1)
    torch.testing.assert_close(full, truncated)  # same values, different graph
    truncated.square().mean().backward()
    grads_trunc = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    full.square().mean().backward()
    block_w = "recurrent.block.attn.wq.weight"
    assert not torch.allclose(grads_trunc[block_w], model.get_parameter(block_w).grad)
    assert torch.isfinite(grads_trunc[block_w]).all()
    # the Prelude receives gradient only through e, injected in the last loop
    assert grads_trunc["prelude.0.attn.wq.weight"].abs().sum() > 0


def test_module_apply_still_works():
    """nn.Module.apply recurses into every submodule: no submodule may shadow it."""
    model = OpenMythos(tiny_config())
    seen = []
    model.apply(lambda m: seen.append(type(m).__name__))
    assert "DepthLoRA" in seen


def test_matrices_cast_once_per_forward_match_per_loop_casts():
    """Training under autocast, the shared block's matrices are cast once for all loops: the same forward,
    gradients within bf16 rounding of the per-loop casts (summed over loops in bf16). Activation
    checkpointing keeps the per-loop casts (its recomputation runs on the fp32 parameters)."""
    torch.manual_seed(0)
    model = OpenMythos(tiny_config()).train()
    ids = torch.randint(0, 97, (2, 8))
    assert set(model.recurrent.matrices_in(torch.bfloat16)) == {
        n for n, p in model.recurrent.block.named_parameters(prefix="block") if p.ndim >= 2}
    results = []
    for once, ckpt in ((False, False), (True, False), (True, True)):
        model.zero_grad()
        runner = LoopRunner(checkpoint_loops=ckpt, cast_matrices_once=once)
        with torch.autocast("cpu", torch.bfloat16):
            out = model(ids, 3, loop_runner=runner)
        out.float().square().mean().backward()
        results.append((out.float(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])))
    (out0, g0), (out1, g1), (out2, g2) = results
    assert torch.equal(out1, out0) and torch.equal(out2, out0) and torch.equal(g2, g0)
    assert 0 < (g1 - g0).norm() / g0.norm() < 1e-3


def _reference_loop(model: OpenMythos, e: torch.Tensor, n_loops: int) -> torch.Tensor:
    """The recurrence written out from the config's equations (recurrence.py docstring), one loop at a time."""
    cfg, rec = model.cfg, model.recurrent
    T = e.shape[1]
    rope = rope_angles(torch.arange(T), cfg.rope_dim, cfg.rope_theta)
    h = {"zeros": torch.zeros_like(e), "embed": e}[cfg.state_init]
    table = rec.loop_embed if cfg.loop_embed == "learned" else \
        loop_embeddings(cfg.max_loop_iters, cfg.dim, cfg.loop_embed_scale, e.device, e.dtype)
    for t in range(n_loops):
        x = h + e + table[min(t, cfg.max_loop_iters - 1)]
        out = rec.block(x, rope) - x
        if rec.lora is not None:
            down, up = rec.lora.adapter(t)
            out = out + rec.lora.norm(x) @ down.T @ up.T
        if cfg.injection == "lti":
            A = rec.injection.get_A()
            h = A * h + torch.exp(rec.injection.log_dt) * rec.injection.B * e + out
        elif cfg.injection == "parcae":
            inj = rec.injection
            step = torch.log1p(torch.exp(inj.dt_raw))  # softplus
            A = torch.exp(-step * torch.exp(inj.log_A)) * (1 - torch.finfo(torch.float32).eps / 2)
            h = A * h + step * (e @ inj.B.T) + out
        else:
            h = h + out
        if cfg.state_norm:
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * rec.state_norm.weight
    return rec.out_norm(h)


@pytest.mark.parametrize("injection", ["lti", "residual", "parcae"])
@pytest.mark.parametrize("state_init", ["zeros", "embed"])
@pytest.mark.parametrize("state_norm", [False, True])
@pytest.mark.parametrize("loop_embed", ["sinusoid", "learned"])
def test_recurrent_block_equals_the_written_out_update(injection, state_init, state_norm, loop_embed):
    model = OpenMythos(tiny_config(injection=injection, state_init=state_init, loop_embed_scale=0.3,
                                   state_norm=state_norm, loop_embed=loop_embed)).eval()
    with torch.no_grad():  # LoRA up-projections start at zero, the norm's gain at one: make them matter
        model.recurrent.lora.up.normal_(std=0.1)
        if state_norm:
            model.recurrent.state_norm.weight.uniform_(0.5, 1.5)
        if injection == "parcae":  # B starts at the identity and the steps at 1: move both
            model.recurrent.injection.B.add_(torch.randn_like(model.recurrent.injection.B) * 0.1)
            model.recurrent.injection.dt_raw.normal_()
        if loop_embed == "learned":  # starts as the sinusoid: a trained table differs from it
            model.recurrent.loop_embed.normal_()
    e = torch.randn(2, 7, model.cfg.dim)
    rope = rope_angles(torch.arange(7), model.cfg.rope_dim, model.cfg.rope_theta)
    for n in (1, 2, 5):  # 5 > max_loop_iters: clamped embedding and adapter
        out, _ = model.recurrent(e, rope, n)
        torch.testing.assert_close(out, _reference_loop(model, e, n))


def test_residual_injection_keeps_what_a_loop_wrote():
    """residual: h_{t+1} - h_t is exactly the block's (and LoRA's) output, nothing decays; lti: the old state
    is scaled by A < 1."""
    model = OpenMythos(tiny_config(injection="residual", lora_rank=0)).eval()
    h, e = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    rope = rope_angles(torch.arange(5), model.cfg.rope_dim, model.cfg.rope_theta)
    zero = torch.zeros(64)
    step = model.recurrent.iteration(h, e, rope, zero, None)
    torch.testing.assert_close(step - h, model.recurrent.block.residual(h + e, rope))
    assert model.recurrent.injection.spectral_radius() == 1.0


def test_random_state_init_draws_noise_at_init_std():
    model = OpenMythos(tiny_config(state_init="random", init_std=0.5))
    e = torch.zeros(4, 64, 64)
    h0 = model.recurrent.initial_state(e)
    assert h0.shape == e.shape and abs(h0.std().item() - 0.5) < 0.02
    assert not torch.equal(h0, model.recurrent.initial_state(e))  # a fresh draw each call (Huginn)


def test_dense_recurrent_ffn_and_no_out_norm():
    from open_mythos.layers import SwiGLU

    model = OpenMythos(tiny_config(recurrent_ffn="dense", loop_out_norm=False))
    assert isinstance(model.recurrent.block.ffn, SwiGLU) and model.moe_layers() == []
    assert model.update_router_bias().numel() == 0
    e = torch.randn(1, 3, 64)
    assert torch.equal(model.recurrent.out_norm(e), e)
    assert model(torch.randint(0, 97, (2, 6)), 2).shape == (2, 6, 97)


def test_init_loops_sets_the_residual_out_init_depth():
    """init_std / sqrt(2 (prelude + loops + coda)) for projections into the residual stream."""
    for init_loops, depth in ((None, 1 + 3 + 1), (1, 1 + 1 + 1)):
        torch.manual_seed(0)
        model = OpenMythos(tiny_config(init_loops=init_loops, init_std=0.02, dim=256, n_heads=4))
        std = model.prelude[0].ffn.w2.weight.std().item()
        assert abs(std - 0.02 / (2 * depth) ** 0.5) < 0.1 * 0.02 / (2 * depth) ** 0.5


def test_state_norm_holds_the_residual_states_scale_fixed():
    """Under the residual update the state's RMS grows with the loops; with state_norm it stays at the norm's
    gain (1 at init) after every loop, whatever the loop count."""
    e = torch.randn(2, 5, 64)
    rope = rope_angles(torch.arange(5), 16, 10_000.0)
    rms = {}
    for state_norm in (False, True):
        torch.manual_seed(0)
        model = OpenMythos(tiny_config(injection="residual", lora_rank=0, state_norm=state_norm)).eval()
        h, rms[state_norm] = torch.zeros_like(e), []
        with torch.no_grad():
            for t in range(8):
                h = model.recurrent.iterate(h, e, t, rope)
                rms[state_norm].append(float(h.pow(2).mean(-1).sqrt().mean()))
    assert rms[False][-1] > 2 * rms[False][0]
    # gain 1 at init; below 1 only by norm_eps against a state of RMS ~0.01 before the norm
    assert all(0.95 < r <= 1.0 for r in rms[True]) and max(rms[True]) - min(rms[True]) < 0.03


def test_parcae_injection_starts_as_lti_and_stays_a_contraction():
    """At init (Δ = 1, B = I) Parcae's injection is the LTI one at its init; for any per-channel steps its A stays
    in [0, 1) after rounding, and B mixes the channels of e."""
    from open_mythos.recurrence import ParcaeInjection

    lti, parcae = LTIInjection(32), ParcaeInjection(32)
    h, e, out = torch.randn(3, 32), torch.randn(3, 32), torch.randn(3, 32)
    torch.testing.assert_close(parcae(h, e, out), lti(h, e, out))
    for dtype in (torch.float32, torch.bfloat16):
        for scale in (0.1, 10.0, 80.0):
            with torch.no_grad():
                parcae.dt_raw.copy_(torch.randn(32) * scale)
                parcae.log_A.copy_(torch.randn(32) * scale)
            A = parcae.get_A(dtype)
            assert A.dtype == dtype and 0.0 <= A.float().min() and A.float().max() < 1.0
            if scale < 80:  # gradients are finite while the rate exp(log Δ + log_A) is (log-rate < 88 in fp32)
                parcae.get_A().sum().backward()
                assert torch.isfinite(parcae.dt_raw.grad).all() and torch.isfinite(parcae.log_A.grad).all()
                parcae.zero_grad()
    with torch.no_grad():  # softplus underflows to 0 below ~-104: log Δ must not become -inf (0 * inf in A)
        parcae.dt_raw.copy_(torch.linspace(-200, 30, 32))
        parcae.log_A.copy_(torch.linspace(100, -3, 32))  # exp(100) = inf in fp32
    parcae.get_A().sum().backward()
    assert torch.isfinite(parcae.dt_raw.grad).all() and torch.isfinite(parcae.get_A()).all()
    with torch.no_grad():
        parcae.dt_raw.zero_()
        parcae.B.copy_(torch.eye(32).roll(1, dims=0))  # channel i of the injection reads channel i - 1 of e
    e1 = torch.zeros(1, 32)
    e1[0, 5] = 1.0
    injected = parcae(torch.zeros(1, 32), e1, torch.zeros(1, 32))
    assert injected[0, 6] > 0 and injected[0].count_nonzero() == 1


def test_sandwich_norm_block_equals_the_written_out_block():
    """sandwich_norm: u = x + norm(Attn(norm(x))), y = u + norm(FFN(norm(u))), in the recurrent block only."""
    from open_mythos.layers import RMSNorm

    model = OpenMythos(tiny_config(sandwich_norm=True)).eval()
    block = model.recurrent.block
    assert isinstance(block.attn_out_norm, RMSNorm) and isinstance(block.ffn_out_norm, RMSNorm)
    assert not isinstance(model.prelude[0].attn_out_norm, RMSNorm)
    with torch.no_grad():
        block.attn_out_norm.weight.uniform_(0.5, 1.5)
        block.ffn_out_norm.weight.uniform_(0.5, 1.5)

    def rms(v, w):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + model.cfg.norm_eps) * w

    x = torch.randn(2, 5, model.cfg.dim)
    rope = rope_angles(torch.arange(5), model.cfg.rope_dim, model.cfg.rope_theta)
    a = rms(block.attn(block.attn_norm(x), rope), block.attn_out_norm.weight)
    f = rms(block.ffn(block.ffn_norm(x + a)), block.ffn_out_norm.weight)
    torch.testing.assert_close(block(x, rope), x + a + f)


def test_learned_loop_embedding_starts_as_the_sinusoid_and_trains():
    from open_mythos.training.optim import param_groups

    model = OpenMythos(tiny_config(loop_embed="learned", loop_embed_scale=0.5))
    cfg = model.cfg
    table = model.recurrent.loop_embed
    torch.testing.assert_close(table.detach(), loop_embeddings(cfg.max_loop_iters, cfg.dim, 0.5, table.device,
                                                                table.dtype))
    model(torch.randint(0, cfg.vocab_size, (2, 6)), cfg.max_loop_iters + 2).float().pow(2).mean().backward()
    assert table.grad is not None and table.grad.abs().sum(-1).gt(0).all()  # every row used (the last clamped)
    assert any(p is table for _, p in param_groups(model)["adamw_no_decay"])


@pytest.mark.parametrize("recipe", [dict(loop_embed="learned"), dict(injection="parcae", sandwich_norm=True)])
def test_new_recipe_parameters_take_the_default_dtype(recipe):
    """Built under a bf16 default dtype (what AutoModelForCausalLM.from_pretrained(dtype=torch.bfloat16) does),
    every parameter is bf16: one fp32 parameter left among bf16 ones breaks FSDP2 (fully_shard wants one dtype
    per group)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = OpenMythos(tiny_config(**recipe))
    finally:
        torch.set_default_dtype(old)
    assert {n: p.dtype for n, p in model.named_parameters() if p.dtype != torch.bfloat16} == {}


def test_flops_count_the_parcae_injections_full_B():
    """Parcae's B is a (dim, dim) matmul every loop: 2 dim^2 forward FLOPs per token per loop, x3 in training."""
    from open_mythos.flops import flops_per_token

    cfg = tiny_config()
    lti, parcae = (flops_per_token(tiny_config(injection=i), 10, 5) for i in ("lti", "parcae"))
    assert parcae - lti == 3 * 2 * 5 * cfg.dim ** 2


def test_flops_count_one_depth_lora_adapter_per_loop():
    """A loop runs one (D_t, U_t) pair of the max_loop_iters stacked ones: 2 * 2 rank dim forward FLOPs per token
    per loop (all the stack was counted: max_loop_iters times too many)."""
    from open_mythos.flops import flops_per_token

    cfg = tiny_config(lora_rank=4, max_loop_iters=6)
    with_lora, without = (flops_per_token(tiny_config(lora_rank=r, max_loop_iters=6), 10, 5) for r in (4, 0))
    assert with_lora - without == 3 * 2 * 5 * 2 * cfg.lora_rank * cfg.dim


def test_recipe_parameters_land_in_adamw_without_decay():
    """Parcae's B (a full matrix started at I: neither Muon's nor weight decay's), its steps and the sandwich norms."""
    from open_mythos.training.optim import param_groups

    model = OpenMythos(tiny_config(injection="parcae", sandwich_norm=True))
    names = {n for n, _ in param_groups(model)["adamw_no_decay"]}
    assert {"recurrent.injection.B", "recurrent.injection.dt_raw", "recurrent.injection.log_A",
            "recurrent.block.attn_out_norm.weight", "recurrent.block.ffn_out_norm.weight"} <= names

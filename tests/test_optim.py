import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from open_mythos import OpenMythos
from open_mythos.training.optim import (BatchedMuon, OptimConfig, build_optimizers, lr_factor, muon_direction,
                                        muon_shares, newton_schulz, newton_schulz_dtype, newton_schulz_flops,
                                        param_groups)

from conftest import tiny_config


def test_parameter_groups_are_explicit_and_complete():
    model = OpenMythos(tiny_config("mla"))
    groups = {k: {n for n, _ in v} for k, v in param_groups(model).items()}
    all_names = {n for n, _ in model.named_parameters()}
    assert set().union(*groups.values()) == all_names
    assert sum(len(v) for v in groups.values()) == len(all_names)  # each parameter exactly once
    assert groups["muon_experts"] == {"recurrent.block.ffn.w1", "recurrent.block.ffn.w2", "recurrent.block.ffn.w3"}
    assert {"embed.weight", "recurrent.block.ffn.router.weight", "recurrent.injection.log_A",
            "recurrent.injection.log_dt", "recurrent.injection.B", "norm.weight"} <= groups["adamw_no_decay"]
    assert {"recurrent.lora.down", "recurrent.lora.up"} <= groups["adamw"]
    assert {"prelude.0.attn.wq_a.weight", "recurrent.block.attn.wkv_b.weight",
            "recurrent.block.ffn.shared.w1.weight", "coda.0.ffn.w2.weight"} <= groups["muon"]
    assert all(p.ndim == 2 for n, p in model.named_parameters() if n in groups["muon"])


def test_untied_head_goes_to_adamw_with_decay():
    model = OpenMythos(tiny_config(tie_word_embeddings=False))
    assert "head.weight" in {n for n, _ in param_groups(model)["adamw"]}


def test_newton_schulz_orthogonalises():
    g = torch.randn(3, 16, 48)
    x = newton_schulz(g, steps=5).float()
    s = torch.linalg.svdvals(x)
    assert s.min() > 0.5 and s.max() < 1.5  # the quintic iteration's known band around 1


@pytest.mark.parametrize("dtype,atol", [(None, 1e-5), (torch.bfloat16, 0.05)])  # CPU's fp32; GPU's bf16
@pytest.mark.parametrize("shape", [(2, 3, 16, 48), (40, 24)])  # a stack of expert stacks; a tall matrix
def test_newton_schulz_matches_the_textbook_iteration(shape, dtype, atol):
    """The fused iteration is X <- a X + (b A + c A^2) X, A = X X^T, on the wide orientation (float64
    reference); on CPU it runs in fp32 unless asked for bf16 (entries ~0.1-0.3: bf16 is good to ~0.05)."""
    torch.manual_seed(0)
    g = torch.randn(shape)
    a, b, c = 3.4445, -4.775, 2.0315
    x = g.double().mT if shape[-2] > shape[-1] else g.double()
    x = x / x.norm(dim=(-2, -1), keepdim=True)
    for _ in range(5):
        A = x @ x.mT
        x = a * x + (b * A + c * A @ A) @ x
    ref = x.mT if shape[-2] > shape[-1] else x
    out = newton_schulz(g, dtype=dtype)
    assert out.shape == g.shape and out.dtype == (dtype or torch.float32)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=atol)


def test_newton_schulz_dtype_is_bf16_off_the_cpu():
    assert newton_schulz_dtype(torch.device("cpu")) == torch.float32
    assert newton_schulz_dtype(torch.device("cuda", 0)) == torch.bfloat16
    assert newton_schulz_dtype(torch.device("meta")) == torch.bfloat16


def test_torch_muon_impl_on_cpu_runs_batched_muon_in_fp32():
    """torch.optim.Muon iterates in bf16 whatever the device: on CPU the 2-D matrices go to BatchedMuon."""
    model = OpenMythos(tiny_config())
    opts = build_optimizers(model, OptimConfig(muon_impl="torch"))
    assert [type(o).__name__ for o in opts] == ["BatchedMuon", "AdamW"]
    muon = {id(p) for p in opts[0].param_groups[0]["params"]}
    groups = param_groups(model)
    assert muon == {id(p) for _, p in groups["muon"] + groups["muon_experts"]}


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon not in this torch")
@pytest.mark.parametrize("compiled,adjust_lr_fn", [(False, None), (True, None), (False, "match_rms_adamw")])
def test_batched_muon_equals_torch_muon_per_slice(compiled, adjust_lr_fn):
    torch.manual_seed(0)
    stacked = torch.nn.Parameter(torch.randn(4, 24, 16))
    slices = [torch.nn.Parameter(stacked.detach()[i].clone()) for i in range(4)]
    ours = BatchedMuon([stacked], lr=0.05, weight_decay=0.1, momentum=0.9, compile=compiled,
                       adjust_lr_fn=adjust_lr_fn)
    ref = torch.optim.Muon(slices, lr=0.05, weight_decay=0.1, momentum=0.9, adjust_lr_fn=adjust_lr_fn)
    for _ in range(3):
        grad = torch.randn(4, 24, 16)
        stacked.grad = grad.clone()
        for i, p in enumerate(slices):
            p.grad = grad[i].clone()
        ours.step()
        ref.step()
    for i, p in enumerate(slices):
        # torch's bf16 iteration against our fp32 one (CPU); one step moves ~0.05
        torch.testing.assert_close(stacked.detach()[i], p.detach(), rtol=0, atol=5e-3)


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon not in this torch")
@pytest.mark.parametrize("direction", ["batched_to_torch", "torch_to_batched"])
def test_muon_state_moves_between_batched_and_torch_muon(direction):
    """A run checkpointed on CPU (BatchedMuon for 2-D matrices) resumes on GPU (torch.optim.Muon) and back:
    the checkpoint's state dict (torch.distributed.checkpoint's, by parameter name) loads into the other class,
    whose next step equals that class's step from the same weights and momentum set by hand."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    make = {"batched": lambda ps: BatchedMuon(ps, lr=0.05, momentum=0.9),
            "torch": lambda ps: torch.optim.Muon(ps, lr=0.05, momentum=0.9)}
    src, dst = direction.split("_to_")
    torch.manual_seed(0)
    first, loaded, by_hand = (torch.nn.Linear(16, 24, bias=False) for _ in range(3))
    opt = make[src]([first.weight])
    first.weight.grad = torch.randn(24, 16)
    opt.step()
    model_sd, optim_sd = get_state_dict(first, opt)
    loaded_opt, by_hand_opt = make[dst]([loaded.weight]), make[dst]([by_hand.weight])
    set_state_dict(loaded, loaded_opt, model_state_dict=model_sd, optim_state_dict=optim_sd)
    by_hand.load_state_dict(first.state_dict())
    by_hand_opt.state[by_hand.weight]["momentum_buffer"] = opt.state[first.weight]["momentum_buffer"].clone()
    grad = torch.randn(24, 16)
    for model, o in ((loaded, loaded_opt), (by_hand, by_hand_opt)):
        model.weight.grad = grad.clone()
        o.step()
    assert not torch.equal(loaded.weight, first.weight)
    assert torch.equal(loaded.weight, by_hand.weight)
    assert torch.equal(loaded_opt.state[loaded.weight]["momentum_buffer"],
                       by_hand_opt.state[by_hand.weight]["momentum_buffer"])


def test_build_optimizers_and_schedule():
    model = OpenMythos(tiny_config())
    opts = build_optimizers(model, OptimConfig())
    kinds = [type(o).__name__ for o in opts]
    assert kinds[-1] == "AdamW" and "BatchedMuon" in kinds
    assert lr_factor(0, 100, 10, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, 0.1) == pytest.approx(1.0)
    assert lr_factor(100, 100, 10, 0.1) == pytest.approx(0.1)
    assert 0.1 < lr_factor(55, 100, 10, 0.1) < 1.0


@pytest.mark.parametrize("field,value", [("muon_lr", 0.0), ("weight_decay", 1.5), ("betas", (0.9, 1.0)),
                                         ("warmup_steps", -1), ("grad_clip", -1.0), ("adamw_lr", "fast")])
def test_optim_config_validation(field, value):
    with pytest.raises(ValueError, match=field):
        OptimConfig(**{field: value})


def test_batched_muon_groups_shapes_like_separate_steps():
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.randn(8, 4))
    c = torch.nn.Parameter(torch.randn(3, 5))
    together = BatchedMuon([a, b, c], lr=0.1)
    copies = [torch.nn.Parameter(t.detach().clone()) for t in (a, b, c)]
    alone = [BatchedMuon([p], lr=0.1) for p in copies]
    for t in (a, b, c, *copies):
        t.grad = torch.ones_like(t) * torch.arange(t.numel()).view_as(t).float().sin()
    together.step()
    for opt in alone:
        opt.step()
    for t, ref in zip((a, b, c), copies):
        torch.testing.assert_close(t, ref)


@pytest.mark.parametrize("compiled", [False, True])
def test_batched_muon_found_inf_skips_on_the_device(compiled):
    """found_inf = 1 (what step_graph sets for a non-finite step): parameters and momentum stay as they are;
    found_inf = 0: the same step as without the attribute."""
    torch.manual_seed(0)
    init = torch.randn(3, 8, 16)
    params = [torch.nn.Parameter(init.clone()) for _ in range(2)]
    opts = [BatchedMuon([p], lr=torch.tensor(0.05), momentum=0.9, compile=compiled) for p in params]
    for p in params:
        p.grad = torch.ones_like(p)
    for opt in opts:
        opt.step()  # a first step: non-zero momentum
    grad = torch.randn(3, 8, 16)
    for p in params:
        p.grad = grad.clone()
    before = params[0].detach().clone(), opts[0].state[params[0]]["momentum_buffer"].clone()
    opts[0].found_inf = torch.ones(())
    opts[0].step()
    assert torch.equal(params[0].detach(), before[0])
    assert torch.equal(opts[0].state[params[0]]["momentum_buffer"], before[1])
    opts[0].found_inf = torch.zeros(())
    opts[0].step()
    opts[1].step()
    torch.testing.assert_close(params[0].detach(), params[1].detach(), rtol=0, atol=1e-6)


@given(st.lists(st.tuples(st.integers(0, 40), st.integers(1, 10**6)), max_size=8), st.integers(1, 8))
@settings(max_examples=200, deadline=None)
def test_muon_shares_cover_every_matrix_balanced_by_flops(groups, world):
    """Every matrix is orthogonalised by exactly one rank, each rank takes floor or ceil of n / W of every group,
    and the ranks' FLOPs differ by at most the costliest matrix (LPT's bound); the plan is deterministic."""
    shares = muon_shares(groups, world)
    assert shares == muon_shares(groups, world)
    for (n, _), share in zip(groups, shares):
        assert len(share) == world and sum(share) == n and max(share) - min(share) <= 1
    load = [sum(share[r] * f for share, (_, f) in zip(shares, groups)) for r in range(world)]
    assert max(load) - min(load) <= max((f for _, f in groups), default=0)


def test_newton_schulz_flops_counts_the_three_matmuls():
    assert newton_schulz_flops((64, 512, 768), steps=5) == 5 * (2 * 512 * 512 * 768 * 2 + 2 * 512 ** 3)
    assert newton_schulz_flops((768, 512)) == newton_schulz_flops((512, 768))


@pytest.mark.parametrize("compiled", [False, True])
def test_muon_direction_rows_are_a_slice_of_the_whole_stack(compiled):
    """A rank's share (rows=(i, j)) is rows i..j-1 of the whole stack's directions, an empty share included, and
    the momentum of every matrix is updated either way."""
    direction = torch.compile(muon_direction, dynamic=False) if compiled else muon_direction
    grads = [torch.randn(3, 8, 16) for _ in range(2)]
    momentum = [torch.randn(3, 8, 16) for _ in range(2)]
    whole_bufs = [m.clone() for m in momentum]
    whole = direction(grads, whole_bufs, 0.9, True, 5, 1e-7)
    for rows in ((1, 4), (6, 6)):
        bufs = [m.clone() for m in momentum]
        part = direction(grads, bufs, 0.9, True, 5, 1e-7, None, rows=rows)
        assert part.shape == (rows[1] - rows[0], 8, 16)
        torch.testing.assert_close(part, whole.flatten(0, 1)[rows[0]:rows[1]], rtol=0, atol=0)
        for b, w in zip(bufs, whole_bufs):
            assert torch.equal(b, w)


SHARD_STEPS = 4


def _sharded_muon_worker(rank: int, init_file: str, out: dict) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)  # the same model on both ranks (DDP's broadcast, here by seed)
        model = OpenMythos(tiny_config())
        groups = param_groups(model)
        params = [p for _, p in groups["muon"] + groups["muon_experts"]]
        opt = BatchedMuon(params, lr=0.05, momentum=0.9, shard=True)
        orthogonalised = []  # matrices this rank orthogonalised, per step
        direction = opt._direction

        def counted(*args):
            out = direction(*args)
            orthogonalised.append(out.shape[0])
            return out

        opt._direction = counted
        for step in range(SHARD_STEPS):
            gen = torch.Generator().manual_seed(step)  # the same (all-reduced) gradient on both ranks
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        out[rank] = {"weights": [p.detach().clone() for p in params], "orthogonalised": orthogonalised,
                     "momentum": [opt.state[p]["momentum_buffer"].clone() for p in params]}
    finally:
        dist.destroy_process_group()


def test_sharded_muon_equals_unsharded_on_two_ranks(tmp_path):
    """BatchedMuon(shard=True) on 2 gloo processes: each rank orthogonalises only its share of the matrices (the
    shares add up to all of them), and after several steps both ranks hold identical weights and momentum, equal to
    one unsharded BatchedMuon's."""
    import torch.multiprocessing as mp

    out = mp.Manager().dict()
    mp.spawn(_sharded_muon_worker, args=(str(tmp_path / "init"), out), nprocs=2)
    torch.manual_seed(0)
    model = OpenMythos(tiny_config())
    groups = param_groups(model)
    params = [p for _, p in groups["muon"] + groups["muon_experts"]]
    opt = BatchedMuon(params, lr=0.05, momentum=0.9)
    for step in range(SHARD_STEPS):
        gen = torch.Generator().manual_seed(step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    r0, r1 = out[0], out[1]
    matrices = sum(p[..., 0, 0].numel() for p in params)
    per_step = len(r0["orthogonalised"]) // SHARD_STEPS
    for step in range(SHARD_STEPS):
        mine = [sum(r["orthogonalised"][step * per_step:(step + 1) * per_step]) for r in (r0, r1)]
        assert sum(mine) == matrices and 0 < min(mine), mine
    for a, b, ref in zip(r0["weights"], r1["weights"], params):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, ref.detach(), rtol=0, atol=1e-6)  # bitwise equal today (CPU)
    for a, b, p in zip(r0["momentum"], r1["momentum"], params):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, opt.state[p]["momentum_buffer"], rtol=0, atol=1e-6)


def test_sharded_muon_refuses_dtensor_parameters(tmp_path):
    """FSDP's parameters are DTensors, sharded by rows: BatchedMuon(shard=True) refuses them with a clear error."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        p = torch.nn.Parameter(distribute_tensor(torch.randn(4, 4), mesh))
        with pytest.raises(ValueError, match="shard=True"):
            BatchedMuon([p], shard=True)
    finally:
        dist.destroy_process_group()

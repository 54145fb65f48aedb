"""Whole-model behaviour: shapes, errors, weights I/O, bf16, generation."""

import json
import pickle

import pytest
import torch
import torch.nn.functional as F

from open_mythos import OpenMythos
from open_mythos.layers import Linear
from open_mythos.training.speed import compile_blocks

from conftest import tiny_config


@pytest.fixture(params=["gqa", "mla"])
def model(request):
    return OpenMythos(tiny_config(request.param)).eval()


def test_forward_shapes_and_loop_counts(model):
    ids = torch.randint(0, 97, (3, 10))
    outs = [model(ids, n) for n in (1, 2, 3, 8)]
    assert all(o.shape == (3, 10, 97) and torch.isfinite(o).all() for o in outs)
    assert not torch.allclose(outs[0], outs[1])
    torch.testing.assert_close(model(ids), model(ids, model.cfg.max_loop_iters))


def test_forward_is_causal(model):
    ids = torch.randint(0, 97, (1, 10))
    changed = ids.clone()
    changed[0, 7] = (changed[0, 7] + 1) % 97
    torch.testing.assert_close(model(ids)[:, :7], model(changed)[:, :7])


@pytest.mark.parametrize("bad,match", [
    (torch.tensor([[1, 2, 97]]), "token id 97 is out of range"),
    (torch.tensor([[-1, 2]]), "token id -1 is out of range"),
    (torch.zeros(1, 65, dtype=torch.long), "exceeds max_seq_len=64"),
    (torch.zeros(1, 0, dtype=torch.long), "empty"),
    (torch.zeros(1, 3), "integer tensor"),
    (torch.zeros(3, dtype=torch.long), r"\(batch, seq_len\)"),
])
def test_bad_inputs_raise_clear_errors(model, bad, match):
    with pytest.raises(ValueError, match=match):
        model(bad)


@pytest.mark.parametrize("n_loops", [0, -1, 2.5, True])
def test_bad_loop_count(model, n_loops):
    with pytest.raises(ValueError, match="n_loops"):
        model(torch.zeros(1, 2, dtype=torch.long), n_loops)


def test_save_load_round_trip_is_bit_identical(model, tmp_path):
    with torch.no_grad():
        model.recurrent.block.ffn.router_bias.normal_()  # buffers travel too
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "config.json", "configuration_open_mythos.py",
                                                          "model.safetensors", "modeling_open_mythos.py"]
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "open_mythos"
    loaded = OpenMythos.from_pretrained(tmp_path)
    assert loaded.cfg == model.cfg
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    ids = torch.randint(0, 97, (2, 7))
    assert torch.equal(model(ids, 2), loaded(ids, 2))
    assert loaded.head.weight.data_ptr() == loaded.embed.weight.data_ptr()  # still tied


def test_loading_never_unpickles(model, tmp_path, monkeypatch):
    model.save_pretrained(tmp_path)

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle used while loading weights")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    OpenMythos.from_pretrained(tmp_path)


def test_from_pretrained_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        OpenMythos.from_pretrained(tmp_path)


@pytest.mark.parametrize("attn_type", ["gqa", "mla"])
def test_pure_bf16_model_runs_and_matches_fp32(attn_type):
    model = OpenMythos(tiny_config(attn_type)).eval()
    ids = torch.randint(0, 97, (2, 12))
    ref = model(ids, 3)
    model_bf16 = OpenMythos(tiny_config(attn_type)).eval()
    model_bf16.load_state_dict(model.state_dict())
    model_bf16.to(torch.bfloat16)
    out = model_bf16(ids, 3)
    assert out.dtype == torch.bfloat16
    # bf16 has ~3 significant digits; compare the distributions, not bits
    p, q = ref.softmax(-1), out.float().softmax(-1)
    assert (p - q).abs().max() < 0.02
    gen = model_bf16.generate(ids, max_new_tokens=4, n_loops=3, temperature=0.0)
    assert gen.shape == (2, 16)


def test_greedy_generation_equals_argmax_of_full_forward(model):
    ids = torch.randint(0, 97, (2, 5))
    out = model.generate(ids, max_new_tokens=6, n_loops=2, temperature=0.0)
    seq = ids
    for _ in range(6):
        nxt = model(seq, 2)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)


def test_top_k_one_is_greedy_and_seed_reproduces(model):
    ids = torch.randint(0, 97, (2, 4))
    greedy = model.generate(ids, 5, n_loops=2, temperature=0.0)
    assert torch.equal(model.generate(ids, 5, n_loops=2, temperature=1.0, top_k=1, seed=3), greedy)
    a = model.generate(ids, 8, n_loops=2, temperature=1.5, top_p=0.9, seed=7)
    b = model.generate(ids, 8, n_loops=2, temperature=1.5, top_p=0.9, seed=7)
    c = model.generate(ids, 8, n_loops=2, temperature=1.5, top_p=0.9, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_eos_stops_and_pads(model):
    ids = torch.randint(0, 97, (2, 4))
    first = model.generate(ids, 1, n_loops=2, temperature=0.0)[:, -1]
    out = model.generate(ids, 10, n_loops=2, temperature=0.0, eos_token_id=int(first[0]))
    assert (out[0, 4:] == first[0]).all()
    if int(first[1]) != int(first[0]) and not (out[1, 4:] == first[0]).any():
        assert out.shape[1] == 14


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_new_tokens=33), "max_output_tokens"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=4, temperature=-1.0), "temperature"),
    (dict(max_new_tokens=4, top_p=0.0), "top_p"),
    (dict(max_new_tokens=4, top_k=-3), "top_k"),
])
def test_generate_rejects_bad_arguments(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        model.generate(torch.zeros(1, 3, dtype=torch.long), **kwargs)


def test_generate_rejects_prompt_that_does_not_fit(model):
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate(torch.zeros(1, 60, dtype=torch.long), max_new_tokens=10)


def test_top_p_keeps_the_nucleus():
    from open_mythos.sampling import SamplingParams, filter_logits

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(filter_logits(logits, SamplingParams(1.0, 0, 0.75)))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(filter_logits(logits, SamplingParams(1.0, 0, 0.85)))
    assert kept.tolist() == [[True, True, True, False]]


def test_compiled_blocks_match_eager_values_and_grads():
    from conftest import tiny_config as cfg

    model = OpenMythos(cfg("gqa")).train()
    ids = torch.randint(0, 97, (2, 16))
    ref = model(ids, 3)
    ref.square().mean().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    runner = compile_blocks(model)
    out = model(ids, 3, loop_runner=runner)
    out.square().mean().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)
    assert model(ids, 5, loop_runner=runner).shape == ref.shape  # another loop count reuses the compiled body


@torch.no_grad()
def test_linear_single_row_compiled_matches_f_linear():
    """Linear's decode path (one row under torch.compile: a matvec reduction) equals F.linear, with and
    without bias, and returns the autocast dtype inside an autocast region like F.linear."""
    for bias in (False, True):
        lin = Linear(48, 80, bias=bias)
        compiled = torch.compile(lin, dynamic=False)
        for shape in ((1, 48), (1, 1, 48), (3, 48)):  # (3, 48): several rows take F.linear
            x = torch.randn(shape)
            torch.testing.assert_close(compiled(x), F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = torch.randn(1, 48)
        y = compiled(x)
        assert y.dtype == F.linear(x, lin.weight, lin.bias).dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), F.linear(x, lin.weight, lin.bias).float(), rtol=2e-2, atol=2e-2)

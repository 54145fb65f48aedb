"""Argument checks (checks.py), and property tests: every MythosConfig and every model() / generate()
argument either runs or raises ValueError/TypeError naming the field or argument."""

import dataclasses

import pytest
import torch
from conftest import tiny_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from open_mythos import MythosConfig, OpenMythos
from open_mythos.cache import KVCache
from open_mythos.checks import check_finite, check_int

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def test_check_int_and_check_finite():
    assert check_int("n", 3, 1, 5) == 3
    for bad, match in [(True, "n must be an int"), (2.0, "n must be an int"), (0, r"n 0 is out of range \[1, 5\]"),
                       (6, r"n 6 is out of range")]:
        with pytest.raises(ValueError, match=match):
            check_int("n", bad, 1, 5)
    assert check_finite("x", 2) == 2.0
    for bad in (float("inf"), float("nan"), "1", None):
        with pytest.raises(ValueError, match="x must be"):
            check_finite("x", bad)


# ------------------------------------------------------------------------------ MythosConfig fields
def _field_values(f: dataclasses.Field):
    """Values for one field: in range, at the edges, out of range, of the wrong type."""
    ints = st.integers(-3, 70) | st.sampled_from([0, 1, 2, 3, 5, 6, 7, 33, 10 ** 12])
    floats = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, 1e-6, 0.5, 1.0, 2.0])
    wrong = st.sampled_from(["x", None, [1], True, 1.5, 3])
    t = str(f.type)
    if t.startswith("int"):
        return ints | wrong
    if t == "float":
        return floats | wrong
    if t == "bool":
        return st.booleans() | wrong
    return st.sampled_from(["mla", "gqa", "final", "act", "", "nope", 3, None])


SMALL = dict(vocab_size=31, dim=16, n_heads=2, n_kv_heads=1, max_seq_len=16, max_loop_iters=2, prelude_layers=1,
             coda_layers=1, kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=4,
             n_experts=4, n_shared_experts=1, n_experts_per_tok=2, expert_dim=8, lora_rank=2, max_output_tokens=8)
FIELDS = {f.name: f for f in dataclasses.fields(MythosConfig)}
# sizes the property test keeps small so that a model it accepts is built and run in milliseconds
SIZE_CAPS = {"vocab_size": 64, "dim": 48, "n_heads": 8, "n_kv_heads": 8, "max_seq_len": 32, "max_loop_iters": 3,
             "prelude_layers": 2, "coda_layers": 2, "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 16,
             "qk_nope_head_dim": 16, "v_head_dim": 16, "n_experts": 8, "n_shared_experts": 2, "n_experts_per_tok": 8,
             "expert_dim": 48, "lora_rank": 8, "max_output_tokens": 16, "dense_ffn_dim": 64}


@st.composite
def config_edits(draw):
    names = draw(st.lists(st.sampled_from(sorted(FIELDS)), min_size=1, max_size=3, unique=True))
    return {n: draw(_field_values(FIELDS[n])) for n in names}


@SETTINGS
@given(edits=config_edits(), attn=st.sampled_from(["gqa", "mla"]))
def test_every_config_runs_or_is_rejected_naming_a_field(edits, attn):
    kwargs = {**SMALL, "attn_type": attn, **edits}
    try:
        cfg = MythosConfig(**kwargs)
    except (ValueError, TypeError) as err:
        assert any(name in str(err) for name in edits) or "dim" in str(err) or "head" in str(err), str(err)
        return
    if any(isinstance(getattr(cfg, n), int) and getattr(cfg, n) > cap for n, cap in SIZE_CAPS.items()
           if getattr(cfg, n) is not None):
        return  # accepted; too large to run here
    model = OpenMythos(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (2, min(6, cfg.max_seq_len)))
    logits = model(ids, 2)  # a training step's forward and backward (grouped experts)...
    assert torch.isfinite(logits).all()
    logits.float().square().mean().backward()
    model.eval()  # ... and a prefill + decode
    n_new = min(2, cfg.max_output_tokens, cfg.max_seq_len - ids.shape[1])
    if n_new >= 1:
        assert model.generate(ids, n_new, n_loops=1, temperature=0.0).shape == (2, ids.shape[1] + n_new)


@pytest.mark.parametrize("name", ["init_std", "loop_embed_scale", "rope_theta", "norm_eps", "router_bias_update_rate",
                                  "act_threshold", "dropout"])
def test_every_float_field_must_be_finite(name):
    for value in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match=f"{name} must be"):
            tiny_config(**{name: value})


# ------------------------------------------------------------------------------ model() / generate() arguments
@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return OpenMythos(MythosConfig(**{**SMALL, "attn_type": "gqa"})).eval()


def _ids(dtype=torch.long, shape=(2, 3), lo=0, hi=31):
    return torch.randint(lo, hi, shape).to(dtype)


FORWARD_ARGS = {
    "input_ids": st.sampled_from([
        _ids(), _ids(torch.int32), _ids(torch.uint8), _ids(torch.int16), _ids(torch.float32), _ids(torch.bool, hi=2),
        _ids(shape=(0, 3)), _ids(shape=(2, 0)), _ids(shape=(3,)), _ids(shape=(1, 2, 3)), _ids(lo=31, hi=40),
        _ids(lo=-5, hi=0), _ids(shape=(1, 17)), [[1, 2]], None]),
    "n_loops": st.sampled_from([None, 1, 3, 0, -1, 2.0, True, "2"]),
    "cache": st.sampled_from([None, "fresh", "other_batch", "full", "not_a_cache"]),
    "backprop_loops": st.sampled_from([None, 1, 5, 0, -2, 1.5, False]),
    "logits_at": st.sampled_from([None, "last", "out_of_range", "float", "wrong_shape", [0, 1]]),
}


def _make(name, value, ids):
    """The argument a drawn label stands for (labels are strings; other values are passed as they are)."""
    B = ids.shape[0] if isinstance(ids, torch.Tensor) and ids.dim() == 2 else 2
    T = ids.shape[1] if isinstance(ids, torch.Tensor) and ids.dim() == 2 else 3
    if name not in ("cache", "logits_at") or not isinstance(value, str):
        return value
    if name == "cache":
        return {"fresh": KVCache(B, 16), "other_batch": KVCache(B + 1, 16), "full": _full_cache(B),
                "not_a_cache": {"pos": 0}}[value]
    return {"last": torch.full((B,), T - 1), "out_of_range": torch.full((B,), T), "float": torch.zeros(B),
            "wrong_shape": torch.zeros(B, 1, dtype=torch.long)}[value]


def _full_cache(B):
    cache = KVCache(B, 4)
    cache.pos = 4
    return cache


@SETTINGS
@given(name=st.sampled_from(sorted(FORWARD_ARGS)), data=st.data())
def test_model_arguments_run_or_are_rejected_naming_the_argument(model, name, data):
    ids = data.draw(FORWARD_ARGS["input_ids"]) if name == "input_ids" else _ids()
    kwargs = {"n_loops": 2}
    if name != "input_ids":
        kwargs[name] = _make(name, data.draw(FORWARD_ARGS[name]), ids)
    try:
        out = model(ids, **kwargs)
    except (ValueError, TypeError) as err:
        assert name in str(err) or (name == "input_ids" and "max_seq_len" in str(err)), str(err)
        return
    assert torch.isfinite(out).all()


GENERATE_ARGS = {
    "max_new_tokens": st.sampled_from([1, 4, 8, 9, 0, -1, 2.0, True]),
    "eos_token_id": st.sampled_from([None, 0, 30, 31, -1, 10 ** 30, 1.0]),
    "seed": st.sampled_from([None, 0, 2 ** 64 - 1, 2 ** 64, -1, 1.5, "7"]),
    "n_loops": st.sampled_from([None, 1, 0, 2.5]),
    "loop_policy": st.sampled_from(["per_loop", "shared", "both", None]),
    "generator": st.sampled_from([None, "cpu", "not_a_generator"]),
    "input_ids": FORWARD_ARGS["input_ids"],
}


@SETTINGS
@given(name=st.sampled_from(sorted(GENERATE_ARGS)), data=st.data())
def test_generate_arguments_run_or_are_rejected_naming_the_argument(model, name, data):
    value = data.draw(GENERATE_ARGS[name])
    if name == "generator" and value is not None:
        value = {"cpu": torch.Generator().manual_seed(0), "not_a_generator": 3}[value]
    kwargs = {"max_new_tokens": 2, "n_loops": 1, name: value}
    ids = kwargs.pop("input_ids", _ids())
    try:
        out = model.generate(ids, **kwargs)
    except (ValueError, TypeError) as err:
        accepted = {name} | ({"max_seq_len", "max_output_tokens"} if name in ("input_ids", "max_new_tokens") else set())
        assert any(a in str(err) for a in accepted), str(err)
        return
    assert out.shape[0] == ids.shape[0] and out.dtype == ids.dtype

"""Incremental decoding with the KV cache reproduces the full-sequence forward."""

import pytest
import torch

from open_mythos import KVCache, OpenMythos

from conftest import tiny_config

TOL = dict(rtol=1e-4, atol=1e-4)  # fp32: different summation order only


def _model(attn_type, **kw):
    return OpenMythos(tiny_config(attn_type, **kw)).eval()


@pytest.mark.parametrize("attn_type", ["gqa", "mla"])
@pytest.mark.parametrize("n_loops", [1, 3, 5])  # 5 > max_loop_iters=3: extrapolated depth
def test_token_by_token_decode_equals_full_forward(attn_type, n_loops):
    model = _model(attn_type)
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        full = model(ids, n_loops)
        cache = KVCache(2, 12)
        steps = [model(ids[:, :5], n_loops, cache)]  # prefill a chunk, then one token at a time
        steps += [model(ids[:, t:t + 1], n_loops, cache) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, **TOL)


@pytest.mark.parametrize("attn_type", ["gqa", "mla"])
def test_chunked_prefill_equals_full_forward(attn_type):
    model = _model(attn_type)
    ids = torch.randint(0, 97, (1, 15))
    with torch.no_grad():
        full = model(ids, 2)
        cache = KVCache(1, 15)
        chunks = [model(ids[:, a:b], 2, cache) for a, b in [(0, 4), (4, 11), (11, 15)]]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, **TOL)


def test_mla_absorbed_decode_equals_naive_decode():
    model = _model("mla")
    ids = torch.randint(0, 97, (2, 9))
    outs = []
    for absorb in (True, False):
        for m in model.modules():
            if hasattr(m, "absorb_decode"):
                m.absorb_decode = absorb
        cache = KVCache(2, 9)
        with torch.no_grad():
            outs.append(torch.cat([model(ids[:, t:t + 1], 3, cache) for t in range(9)], dim=1))
    torch.testing.assert_close(outs[0], outs[1], **TOL)


def test_mla_cache_holds_only_latent_and_rope_key():
    cfg = tiny_config("mla")
    model = OpenMythos(cfg).eval()
    cache = KVCache(1, 8)
    with torch.no_grad():
        model(torch.randint(0, 97, (1, 8)), 2, cache)
    n_sites = cfg.prelude_layers + cfg.coda_layers + 2  # + one recurrent slot per loop
    per_token = n_sites * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    assert cache.bytes_per_token() == per_token


def test_shared_loop_cache_is_loop_independent_and_exact_for_one_loop():
    model = _model("gqa")
    ids = torch.randint(0, 97, (1, 6))
    sizes = {}
    for n_loops in (1, 4):
        cache = KVCache(1, 6, loop_policy="shared")
        with torch.no_grad():
            out = torch.cat([model(ids[:, t:t + 1], n_loops, cache) for t in range(6)], dim=1)
        sizes[n_loops] = cache.nbytes()
        if n_loops == 1:
            torch.testing.assert_close(out, model(ids, 1), **TOL)
    assert sizes[1] == sizes[4]


def test_cache_overflow_and_bad_policy():
    model = _model("gqa")
    cache = KVCache(1, 4)
    with pytest.raises(ValueError, match="cache overflow"):
        model(torch.zeros(1, 5, dtype=torch.long), 1, cache)
    with pytest.raises(ValueError, match="loop_policy"):
        KVCache(1, 4, loop_policy="everything")

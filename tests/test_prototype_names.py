"""Code written against the public OpenMythos prototype's names runs on this library (open_mythos.main)."""

import torch

from open_mythos import attention, blocks, config, layers, model, moe, recurrence
from open_mythos.cache import KVCache

from conftest import tiny_config


def test_every_prototype_name_imports_and_is_bound_to_ours():
    from open_mythos.main import (ACTHalting, Expert, GQAttention, LoRAAdapter, LTIInjection, MLAttention,  # noqa: F401
                                  MoEFFN, MythosConfig, OpenMythos, RecurrentBlock, RMSNorm, TransformerBlock,
                                  apply_rope, loop_index_embedding, precompute_rope_freqs)

    same = {GQAttention: attention.GQAttention, MLAttention: attention.MLAttention, MoEFFN: moe.MoE,
            Expert: layers.SwiGLU, LTIInjection: recurrence.LTIInjection, RecurrentBlock: recurrence.RecurrentBlock,
            RMSNorm: layers.RMSNorm, TransformerBlock: blocks.TransformerBlock, MythosConfig: config.MythosConfig,
            OpenMythos: model.OpenMythos}
    for ours, theirs in same.items():
        assert ours is theirs
    assert issubclass(LoRAAdapter, recurrence.DepthLoRA) and issubclass(ACTHalting, recurrence.ACTHalting)


def test_rope_adapters_match_the_prototypes_complex_rotation():
    from open_mythos.main import apply_rope, precompute_rope_freqs

    x = torch.randn(2, 5, 3, 8)
    freqs = precompute_rope_freqs(8, 16, theta=10000.0)
    assert freqs.shape == (16, 4) and freqs.is_complex()
    # the prototype: adjacent pairs as complex numbers times e^{i p theta_k}, theta_k = theta^(-2k/d)
    theta_k = 1.0 / 10000.0 ** (torch.arange(0, 8, 2).float() / 8)
    phasor = torch.polar(torch.ones(5, 4), torch.outer(torch.arange(5).float(), theta_k))
    ref = torch.view_as_real(torch.view_as_complex(x.reshape(2, 5, 3, 4, 2)) * phasor[None, :, None]).flatten(-2)
    torch.testing.assert_close(apply_rope(x, freqs[:5]), ref)
    cos, sin = layers.rope_angles(torch.arange(5), 8, 10000.0)
    assert torch.equal(apply_rope(x, freqs[:5]), apply_rope(x, cos, sin))


def test_loop_index_embedding_is_our_loop_embedding():
    from open_mythos.main import loop_index_embedding

    h = torch.randn(2, 3, 64)
    for t in (0, 1, 5):
        # the prototype's formula
        freqs = 1.0 / 10000.0 ** (torch.arange(0, 8, 2).float() / 8)
        emb = torch.zeros(64)
        emb[:8] = torch.cat([(t * freqs).sin(), (t * freqs).cos()])
        torch.testing.assert_close(loop_index_embedding(h, t, 8), h + emb)
        # ours at amplitude 1 and width dim / 8 = 8
        ours = recurrence.loop_embeddings(t + 1, 64, 1.0, h.device, h.dtype)[t]
        torch.testing.assert_close(loop_index_embedding(h, t, 8), h + ours)


def test_prototype_modules_build_and_run_with_its_signatures():
    from open_mythos.main import ACTHalting, Expert, LoRAAdapter, LTIInjection, MoEFFN

    cfg = tiny_config()
    x = torch.randn(2, 4, cfg.dim)
    lora = LoRAAdapter(cfg.dim, 4, max_loops=3)
    assert lora(x, 7).shape == x.shape  # index past max_loops: the last adapter
    p = ACTHalting(cfg.dim)(x)
    assert p.shape == (2, 4) and ((p > 0) & (p < 1)).all()
    assert LTIInjection(cfg.dim)(x, x, x).shape == x.shape
    assert Expert(cfg.dim, 32)(x).shape == MoEFFN(cfg)(x).shape == x.shape


def test_model_level_use_as_in_the_seeds():
    from open_mythos.main import MythosConfig, OpenMythos

    cfg = MythosConfig(**tiny_config().to_dict())
    m = OpenMythos(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 6))
    with torch.no_grad():
        for n in (1, 4, 8):
            assert m(ids, n_loops=n).shape == (2, 6, cfg.vocab_size)
        cache = KVCache(2, 12)
        full = m(ids, 4)
        step = torch.cat([m(ids[:, :5], 4, cache), m(ids[:, 5:], 4, cache)], dim=1)
        torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-5)
    out = m.generate(ids, max_new_tokens=3, n_loops=2, temperature=0)
    assert out.shape == (2, 9) and torch.equal(out[:, :6], ids)

import pytest

from open_mythos import MythosConfig

from conftest import tiny_config

BAD = [
    (dict(attn_type="mlaa"), "attn_type"),
    (dict(attn_type="gqa", n_heads=5), "n_heads"),
    (dict(attn_type="gqa", n_heads=4, n_kv_heads=3), "n_kv_heads"),
    (dict(attn_type="gqa", dim=12, n_heads=4), "head dim"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
    (dict(n_experts_per_tok=9), "n_experts_per_tok"),
    (dict(max_loop_iters=0), "max_loop_iters"),
    (dict(act_threshold=0.0), "act_threshold"),
    (dict(act_threshold=1.5), "act_threshold"),
    (dict(dropout=1.0), "dropout"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(prelude_layers=-1), "prelude_layers"),
    (dict(lora_rank=-2), "lora_rank"),
    (dict(rope_theta=0.0), "rope_theta"),
    (dict(loop_embed_scale=-0.1), "loop_embed_scale"),
    (dict(dim=64.0), "dim"),
    (dict(n_experts=True), "n_experts"),
    (dict(loop_output="mix"), "loop_output"),
    (dict(kv_lora_rank=0), "kv_lora_rank"),
    (dict(injection="additive"), "injection"),
    (dict(loop_embed="table"), "loop_embed"),
    (dict(init_std=2.0), "init_std"),
    (dict(state_init="ones"), "state_init"),
    (dict(recurrent_ffn="swiglu"), "recurrent_ffn"),
    (dict(init_loops=0), "init_loops"),
    (dict(loop_out_norm=1), "loop_out_norm"),
]


@pytest.mark.parametrize("overrides,field", BAD)
def test_impossible_values_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**{"attn_type": "mla", **overrides})


def test_defaults_are_the_seed_defaults():
    cfg = MythosConfig()
    assert (cfg.vocab_size, cfg.attn_type, cfg.act_threshold, cfg.max_loop_iters) == (32000, "mla", 0.99, 16)


def test_dict_round_trip_and_unknown_field():
    cfg = tiny_config()
    assert MythosConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown MythosConfig field"):
        MythosConfig.from_dict({**cfg.to_dict(), "n_layerz": 3})

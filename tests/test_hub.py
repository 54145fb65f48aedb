"""save_pretrained directories never lie: config.json is complete and versioned, load errors name the
file, and damaged weight bytes are detected (hub.py)."""

import dataclasses
import json

import pytest
import torch
from conftest import tiny_config
from safetensors import safe_open

from open_mythos import MythosConfig, OpenMythos
from open_mythos.hub import DIGEST_KEY, FIELDS_ADDED, FORMAT_VERSION, read_config, tensor_digest
from open_mythos.tokenizer import tokenizer_for


@pytest.fixture
def saved(tmp_path):
    model = OpenMythos(tiny_config())
    model.save_pretrained(tmp_path)
    return model, tmp_path


def _edit_config(directory, edit):
    path = directory / "config.json"
    d = json.loads(path.read_text())
    edit(d)
    path.write_text(json.dumps(d))


def test_config_json_is_versioned_and_complete(saved):
    model, directory = saved
    d = json.loads((directory / "config.json").read_text())
    assert d["format_version"] == FORMAT_VERSION
    assert read_config(directory) == model.cfg


def test_missing_fields_are_an_error_naming_them(saved):
    _, directory = saved
    _edit_config(directory, lambda d: (d.pop("norm_eps"), d.pop("init_std")))
    with pytest.raises(ValueError, match=r"config\.json: missing MythosConfig field\(s\): norm_eps, init_std"):
        OpenMythos.from_pretrained(directory)


def _drop(d, names):
    for name in names:
        d.pop(name)


# MythosConfig's fields at format 0; every field added since is in hub.FIELDS_ADDED under the version that added it
FORMAT_0_FIELDS = {
    "vocab_size", "dim", "n_heads", "n_kv_heads", "max_seq_len", "max_loop_iters", "prelude_layers", "coda_layers",
    "attn_type", "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "n_experts",
    "n_shared_experts", "n_experts_per_tok", "expert_dim", "act_threshold", "rope_theta", "lora_rank",
    "max_output_tokens", "dropout", "loop_output", "router_bias_update_rate", "norm_eps", "init_std",
    "tie_word_embeddings", "dense_ffn_dim"}


def test_every_config_field_is_known_to_a_format_version():
    """A field added to MythosConfig without a format bump would make every file saved before it unloadable
    ("missing field"): each field is either in format 0 or added, with its old-model value, by one version."""
    added = [name for version in sorted(FIELDS_ADDED) for name in FIELDS_ADDED[version]]
    assert len(added) == len(set(added)) and not FORMAT_0_FIELDS & set(added)
    assert {f.name for f in dataclasses.fields(MythosConfig)} == FORMAT_0_FIELDS | set(added)
    assert max(FIELDS_ADDED) == FORMAT_VERSION


@pytest.mark.parametrize("version", [0, 1, 2, 3])
def test_old_format_files_migrate_by_the_documented_rule(tmp_path, version):
    """A config.json of format 0 (no format_version, no loop_embed_scale), 1 (no recurrence-recipe fields), 2
    (no attn_window) or 3 (no loop_embed, sandwich_norm) loads the model those versions built: loop_embed_scale
    = 1, LTI injection, zero initial state, out-norm, MoE, init depth from max_loop_iters, no attention window,
    the fixed loop table, pre-norm blocks; other missing fields are still errors."""
    model = OpenMythos(tiny_config(loop_embed_scale=1.0))
    model.save_pretrained(tmp_path)
    directory = tmp_path
    assert set(FIELDS_ADDED[2]) == {"injection", "state_init", "loop_out_norm", "recurrent_ffn", "init_loops"}
    dropped = [name for v in range(version + 1, FORMAT_VERSION + 1) for name in FIELDS_ADDED[v]]
    _edit_config(directory, lambda d: (d.update(format_version=version), _drop(d, dropped)))
    if version == 0:
        _edit_config(directory, lambda d: d.pop("format_version"))
    loaded = OpenMythos.from_pretrained(directory)
    assert loaded.cfg == model.cfg
    ids = torch.randint(0, 97, (1, 6))
    torch.testing.assert_close(loaded(ids, 2), model.eval()(ids, 2), rtol=0, atol=0)
    _edit_config(directory, lambda d: d.pop("rope_theta"))
    with pytest.raises(ValueError, match="rope_theta"):
        OpenMythos.from_pretrained(directory)
    _edit_config(directory, lambda d: d.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(ValueError, match="format_version"):
        OpenMythos.from_pretrained(directory)


@pytest.mark.parametrize("text,match", [
    ("[1, 2]", r"config\.json: expected a JSON object, got list"),
    ("{\"dim\": 64,", r"config\.json: not valid JSON"),
    ("\"dim\"", r"config\.json: expected a JSON object, got str"),
])
def test_unreadable_config_json_names_the_file(saved, text, match):
    _, directory = saved
    (directory / "config.json").write_text(text)
    with pytest.raises(ValueError, match=match):
        OpenMythos.from_pretrained(directory)


@pytest.mark.parametrize("text,match", [
    ("{}", r"tokenizer_config\.json: \"tokenizer\" must be one of"),
    ("{\"tokenizer\": \"gpt2\"}", r"tokenizer_config\.json: \"tokenizer\" must be one of"),
    ("[\"byte\"]", r"tokenizer_config\.json: expected a JSON object"),
    ("byte", r"tokenizer_config\.json: not valid JSON"),
])
def test_unreadable_tokenizer_config_names_the_file(tmp_path, text, match):
    (tmp_path / "tokenizer_config.json").write_text(text)
    with pytest.raises(ValueError, match=match):
        tokenizer_for(tmp_path, 257)


def test_weights_carry_a_digest_of_their_bytes(saved):
    model, directory = saved
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        recorded = f.metadata()[DIGEST_KEY]
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert "head.weight" not in tensors  # tied: stored once
    state = {k: v for k, v in model.state_dict().items() if k != "head.weight"}
    assert recorded == tensor_digest(state) == tensor_digest(tensors)


def test_damaged_weight_bytes_are_detected(saved):
    model, directory = saved
    path = directory / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x40  # one bit of the last tensor's data: the header still parses
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model\.safetensors: the tensor bytes are damaged"):
        OpenMythos.from_pretrained(directory)
    loaded = OpenMythos.from_pretrained(directory, verify=False)  # skippable: loads the damaged bytes
    assert any(not torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    path.write_bytes(bytes(data[:100]))  # truncated: the header no longer parses
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        OpenMythos.from_pretrained(directory)


def test_weights_without_a_digest_still_load(saved):
    """Files written before digests (no metadata) load unchecked."""
    from safetensors.torch import save_file

    model, directory = saved
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "head.weight"}
    save_file(state, str(directory / "model.safetensors"))
    loaded = OpenMythos.from_pretrained(directory)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_transformers_config_checks_missing_fields_too(saved):
    pytest.importorskip("transformers")
    from open_mythos.hf import OpenMythosConfig

    _, directory = saved
    assert OpenMythosConfig.from_pretrained(directory).to_mythos() == read_config(directory)
    _edit_config(directory, lambda d: d.pop("n_experts"))
    with pytest.raises(ValueError, match="n_experts"):
        OpenMythosConfig.from_pretrained(directory)


def test_recipe_options_with_their_own_parameters_round_trip(tmp_path):
    """Parcae's full B and step, a learned loop table and the sandwich norms' gains are saved and loaded (no pickle)."""
    model = OpenMythos(tiny_config(injection="parcae", loop_embed="learned", sandwich_norm=True)).eval()
    with torch.no_grad():
        for name in ("recurrent.injection.B", "recurrent.injection.dt_raw", "recurrent.loop_embed",
                     "recurrent.block.ffn_out_norm.weight"):
            p = model.get_parameter(name)
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path)
    loaded = OpenMythos.from_pretrained(tmp_path)
    ids = torch.randint(0, 97, (1, 6))
    torch.testing.assert_close(loaded(ids, 3), model(ids, 3), rtol=0, atol=0)

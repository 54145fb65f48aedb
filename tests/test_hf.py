"""transformers integration: Auto classes load our save_pretrained directories (with the import and
with trust_remote_code), generate honours n_loops, and the formats round-trip."""

import json
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch

from conftest import tiny_config
from open_mythos import OpenMythos

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("attn", ["gqa", "mla"])
@pytest.mark.parametrize("tied", [True, False])
def test_auto_model_loads_a_save_pretrained_directory(tmp_path, attn, tied):
    import open_mythos.hf  # noqa: F401  registers the Auto classes
    from transformers import AutoConfig, AutoModelForCausalLM

    model = OpenMythos(tiny_config(attn, tie_word_embeddings=tied)).eval()
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "open_mythos"
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids, n_loops=2).logits, model(ids, 2), rtol=1e-5, atol=1e-6)
        assert torch.equal(hf.generate(ids, max_new_tokens=6, do_sample=False, n_loops=3),
                           model.generate(ids, 6, 3, temperature=0))
        out = hf(ids, labels=ids, n_loops=2)
        ref = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        assert out.loss.item() == pytest.approx(ref.item(), rel=1e-6)
    hf.save_pretrained(tmp_path / "again")  # our format: loadable without transformers
    back = OpenMythos.from_pretrained(tmp_path / "again")
    torch.testing.assert_close(back(ids, 2), model(ids, 2), rtol=1e-5, atol=1e-6)


def test_a_state_norm_model_round_trips_exactly(tmp_path):
    """state_norm (config format 3) and its trained norm weights survive save_pretrained -> from_pretrained (the
    same logits, bit for bit) and -> AutoModelForCausalLM."""
    import open_mythos.hf  # noqa: F401
    from transformers import AutoModelForCausalLM

    model = OpenMythos(tiny_config(injection="residual", state_norm=True)).eval()
    with torch.no_grad():
        model.recurrent.state_norm.weight.uniform_(0.5, 1.5)
    model.save_pretrained(tmp_path)
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        ref = model(ids, 5)
        assert torch.equal(OpenMythos.from_pretrained(tmp_path)(ids, 5), ref)
        hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        assert hf.config.state_norm  # transformers' loaded tensors sum in another order: last-bit differences
        torch.testing.assert_close(hf(ids, n_loops=5).logits, ref, rtol=1e-5, atol=1e-6)


def test_trust_remote_code_without_importing_open_mythos_hf(tmp_path):
    model = OpenMythos(tiny_config()).eval()
    model.save_pretrained(tmp_path)
    ids = [[1, 2, 3, 4, 5]]
    expected = model.generate(torch.tensor(ids), 5, 2, temperature=0)[0].tolist()
    script = f"""
import json, sys, torch
from transformers import AutoModelForCausalLM
assert "open_mythos.hf" not in sys.modules
m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)
print(json.dumps(m.generate(torch.tensor({ids}), max_new_tokens=5, do_sample=False, n_loops=2)[0].tolist()))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == expected


def test_model_card_and_padding_error(tmp_path):
    import open_mythos.hf  # noqa: F401
    from transformers import AutoModelForCausalLM

    OpenMythos(tiny_config()).save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "AutoModelForCausalLM" in card and "active per token" in card
    hf = AutoModelForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="padding"):
        hf(torch.ones(2, 4, dtype=torch.long), attention_mask=torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]))


_texts = st.text(st.characters(codec="utf-8"), max_size=40)


@settings(max_examples=60, deadline=None)
@given(parts=st.lists(_texts, min_size=1, max_size=3))
def test_auto_tokenizer_loads_a_byte_model_directory(tmp_path_factory, parts):
    """A training run's model/ directory (save_tokenizer_name "byte") loads with AutoTokenizer, which
    then encodes and decodes exactly like ByteTokenizer, <|endoftext|> included."""
    from transformers import AutoTokenizer

    from open_mythos import ByteTokenizer
    from open_mythos.tokenizer import tokenizer_for

    directory = _byte_dir(tmp_path_factory)
    hf = AutoTokenizer.from_pretrained(directory)
    text = "<|endoftext|>".join(parts)
    ids = ByteTokenizer().encode(text, allow_special=True)
    assert hf(text)["input_ids"] == ids
    assert hf.decode(ids) == ByteTokenizer().decode(ids) == text
    assert (len(hf), hf.eos_token_id) == (257, 256)
    assert isinstance(tokenizer_for(directory, 257), ByteTokenizer)  # our own reader still finds it


def _byte_dir(tmp_path_factory):
    from open_mythos.tokenizer import save_tokenizer_name

    directory = tmp_path_factory.getbasetemp() / "byte-tokenizer"
    if not directory.exists():
        directory.mkdir()
        save_tokenizer_name(directory, "byte")
    return directory


def test_auto_model_starts_with_no_expert_load_counted(tmp_path):
    """transformers builds the model on the meta device and gives non-persistent buffers uninitialised memory:
    the MoE's load counter (what update_router_bias reads, possibly NaN) must start at zero as in OpenMythos."""
    import open_mythos.hf  # noqa: F401
    from transformers import AutoModelForCausalLM

    from open_mythos.moe import MoE

    model = OpenMythos(tiny_config())
    model.save_pretrained(tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path)
    loads = [m.expert_load for m in hf.modules() if isinstance(m, MoE)]
    assert loads and all(torch.equal(load, torch.zeros_like(load)) for load in loads)
    bias = {name: b.clone() for name, b in hf.named_buffers() if name.endswith("router_bias")}
    hf.model.update_router_bias()  # no tokens counted: no change
    assert all(torch.equal(b, dict(hf.named_buffers())[name]) for name, b in bias.items())

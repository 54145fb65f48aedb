import pytest

from open_mythos import ByteTokenizer, MythosTokenizer

TEXTS = ["Hello, world!", "To be, or not to be: that is the question.", "ünïcødé ✓ 漢字 🙂", "  spaces\n\ttabs  "]


def test_o200k_harmony_offline_vocab_and_round_trip():
    tok = MythosTokenizer()
    assert tok.vocab_size == 201088
    for text in TEXTS:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    assert tok.encode("Hello") == [13225]  # o200k: "Hello" is one token
    assert tok.eos_token_id == 199999
    assert tok.encode("<|endoftext|>") != [199999]  # specials are text unless allowed
    assert tok.encode("<|endoftext|>", allow_special=True) == [199999]


def test_byte_tokenizer():
    tok = ByteTokenizer()
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("a<|endoftext|>b", allow_special=True) == [97, 256, 98]
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([300])

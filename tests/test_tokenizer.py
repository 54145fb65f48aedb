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


@pytest.mark.parametrize("make", [ByteTokenizer, MythosTokenizer], ids=["byte", "o200k_harmony"])
def test_decoding_an_id_outside_the_vocabulary_names_it_and_the_range(make):
    tok = make()
    hi = tok.vocab_size - 1
    for bad in (-1, tok.vocab_size, 10 ** 20):
        with pytest.raises(ValueError, match=rf"token id {bad} is out of range \[0, {hi}\]"):
            tok.decode([1, bad])
    with pytest.raises(ValueError, match="token id must be an int"):
        tok.decode([1.0])
    assert tok.decode([hi]) == tok.decode([hi])  # the last id decodes

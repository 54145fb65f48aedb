import pytest

from open_mythos.inference.text import TextStream
from open_mythos.tokenizer import ByteTokenizer, MythosTokenizer

TEXT = "Héllo wörld, 日本語 END of it"


@pytest.mark.parametrize("tok", [ByteTokenizer(), MythosTokenizer()], ids=["byte", "o200k"])
def test_stream_releases_whole_characters_and_equals_decode(tok):
    stream = TextStream(tok)
    pieces = [stream.push(t) for t in tok.encode(TEXT)] + [stream.flush()]
    assert "".join(pieces) == TEXT
    assert all("\ufffd" not in p for p in pieces)  # multi-byte characters are never cut


@pytest.mark.parametrize("tok", [ByteTokenizer(), MythosTokenizer()], ids=["byte", "o200k"])
def test_stop_string_spanning_tokens_truncates_and_never_leaks(tok):
    stream = TextStream(tok, ["END", "zzz"])
    out = ""
    for t in tok.encode(TEXT):
        out += stream.push(t)
        assert "E" not in out  # the stop string's start is held back until it is decided
        if stream.stopped:
            break
    out += stream.flush()
    assert stream.stopped and out == "Héllo wörld, 日本語 "


def test_bad_stop_strings():
    with pytest.raises(ValueError, match="stop strings"):
        TextStream(ByteTokenizer(), [""])

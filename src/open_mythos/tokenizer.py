"""Tokenizers.

``MythosTokenizer``: gpt-oss-20b's ``o200k_harmony`` encoding (vocab 201,088), built offline with
tiktoken. The o200k_base BPE ranks come from the ``bpe-openai`` package (``o200k_base.tiktoken.gz``),
checked against the sha256 that tiktoken expects; pattern and harmony special tokens are tiktoken's
own definitions.

``ByteTokenizer``: UTF-8 bytes (256 ids) + ``<|endoftext|>``, for tiny models and tests.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import importlib.util
import json
import re
from functools import lru_cache
from pathlib import Path
from unittest import mock

import tiktoken
from tiktoken_ext import openai_public

from .checks import check_int, read_json

O200K_BASE_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
ENDOFTEXT = "<|endoftext|>"
# tiktoken's pre-tokenisation regex backtracks over a whitespace run (``\s+(?!\S)``) and fails past
# ~500,000 characters; runs longer than this are cut into pieces of this length and encoded apart
MAX_WHITESPACE_RUN = 4096
_LONG_WHITESPACE = re.compile(r"\s{%d,}" % (MAX_WHITESPACE_RUN + 1))


def split_long_whitespace(text: str) -> list[str]:
    """``text`` cut inside its whitespace runs longer than ``MAX_WHITESPACE_RUN`` so that no piece
    holds a longer run; "".join(pieces) == text. Text without such a run is one piece (encodes as
    before)."""
    pieces, start = [], 0
    for run in _LONG_WHITESPACE.finditer(text):
        cut = run.start()
        while run.end() - cut > MAX_WHITESPACE_RUN:
            cut += MAX_WHITESPACE_RUN
            pieces.append(text[start:cut])
            start = cut
    return pieces + [text[start:]]


def _load_shipped_o200k_ranks(url: str, expected_hash: str | None = None) -> dict[bytes, int]:
    """Stand-in for tiktoken's downloader: read the ranks file shipped in ``bpe-openai``."""
    spec = importlib.util.find_spec("bpe_openai")  # locate the file without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the bpe-openai package (o200k_base ranks) is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "o200k_base.tiktoken.gz"
    raw = gzip.decompress(path.read_bytes())
    digest = hashlib.sha256(raw).hexdigest()
    if digest != (expected_hash or O200K_BASE_SHA256):
        raise ValueError(f"shipped o200k_base ranks have sha256 {digest}, expected {expected_hash}")
    ranks = {}
    for line in raw.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@lru_cache(maxsize=1)
def o200k_harmony_encoding() -> tiktoken.Encoding:
    with mock.patch.object(openai_public, "load_tiktoken_bpe", _load_shipped_o200k_ranks):
        spec = openai_public.o200k_harmony()
    return tiktoken.Encoding(spec["name"], pat_str=spec["pat_str"], mergeable_ranks=spec["mergeable_ranks"],
                             special_tokens=spec["special_tokens"])


class MythosTokenizer:
    """o200k_harmony via tiktoken, offline. ``encode``/``decode``/``vocab_size``/``eos_token_id``."""

    max_token_bytes = 128  # the longest o200k token (bytes): a text of n bytes has >= n / 128 tokens

    def __init__(self) -> None:
        self.encoding = o200k_harmony_encoding()

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    @property
    def eos_token_id(self) -> int:
        return self.encoding.encode_single_token(ENDOFTEXT)

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of ``text``; special-token text (``<|end|>`` ...) is plain text unless
        ``allow_special``. Raises ValueError for a lone surrogate (not Unicode text)."""
        _check_unicode(text)
        special = dict(allowed_special="all" if allow_special else set(), disallowed_special=())
        return [i for piece in split_long_whitespace(text) for i in self.encoding.encode(piece, **special)]

    def decode(self, ids: list[int]) -> str:
        return self._decode_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, token: int) -> bytes:
        return self._decode_bytes([token])

    def _decode_bytes(self, ids: list[int]) -> bytes:
        try:
            return self.encoding.decode_bytes(check_decode_ids(ids, self.vocab_size))
        except KeyError as err:  # a hole in the id range: ids the encoding does not define
            raise ValueError(f"token id {err.args[0]} is not in the o200k_harmony vocabulary") from None

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        """Harmony format: <|start|>{role}<|message|>{content}<|end|> ... <|start|>assistant<|message|>.
        The markers are inserted by id; roles and contents are encoded as plain text, so a message
        cannot contain a marker (``<|end|>`` in a content is text, not the end of the turn)."""
        start, message, end = (self.encoding.encode_single_token(t) for t in ("<|start|>", "<|message|>", "<|end|>"))
        ids: list[int] = []
        for m in messages:
            ids += [start, *self.encode(m["role"]), message, *self.encode(m["content"]), end]
        return ids + [start, *self.encode("assistant"), message]

    @property
    def chat_stop_token_ids(self) -> tuple[int, ...]:
        """Tokens that end an assistant turn."""
        return tuple(self.encoding.encode_single_token(t) for t in ("<|end|>", "<|return|>", ENDOFTEXT))


class ByteTokenizer:
    """Byte-level tokenizer: ids 0..255 are UTF-8 bytes, 256 is ``<|endoftext|>``."""

    vocab_size = 257
    eos_token_id = 256
    max_token_bytes = 1

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        _check_unicode(text)
        if allow_special and ENDOFTEXT in text:
            parts = text.split(ENDOFTEXT)
            ids: list[int] = []
            for i, part in enumerate(parts):
                ids += ([self.eos_token_id] if i else []) + list(part.encode("utf-8"))
            return ids
        return list(text.encode("utf-8"))

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        """<|role|>\ncontent\n per message, then <|assistant|>\n; the reply ends at <|endoftext|>.
        The markers are plain bytes (this tokenizer has no special token but <|endoftext|>, which a
        content encodes as text)."""
        text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)
        return self.encode(text + "<|assistant|>\n")

    @property
    def chat_stop_token_ids(self) -> tuple[int, ...]:
        return (self.eos_token_id,)

    def decode(self, ids: list[int]) -> str:
        return b"".join(map(self.token_bytes, check_decode_ids(ids, self.vocab_size))).decode("utf-8", errors="replace")

    def token_bytes(self, token: int) -> bytes:
        if token == self.eos_token_id:
            return ENDOFTEXT.encode()
        return bytes((check_int("token id", token, 0, 255),))


def _check_unicode(text: str) -> None:
    """Raise ValueError if ``text`` holds a lone surrogate (JSON's "\\ud800" decodes to one): it has
    no UTF-8 encoding, so it cannot be tokenised."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"text is not valid Unicode: {err.reason} at character {err.start}") from None


def check_vocab_covered(vocab_size: int, tokenizer) -> None:
    """Raise ValueError if a model's vocabulary exceeds its tokenizer's: the ids past the tokenizer's
    could be sampled but never decoded (and never appear in its training data)."""
    if vocab_size > tokenizer.vocab_size:
        raise ValueError(f"the model's vocabulary ({vocab_size} ids) exceeds its tokenizer's "
                         f"({type(tokenizer).__name__}, {tokenizer.vocab_size} ids): ids {tokenizer.vocab_size}.."
                         f"{vocab_size - 1} could be generated but not decoded; use the tokenizer the model "
                         "was trained with, or a config whose vocab_size fits it")


def check_decode_ids(ids, vocab_size: int) -> list[int]:
    """``ids`` as a list of ints in [0, vocab_size); ValueError naming the first id outside it."""
    return [check_int("token id", i, 0, vocab_size - 1) for i in ids]


TOKENIZERS = {"byte": ByteTokenizer, "o200k_harmony": MythosTokenizer}
TOKENIZER_CONFIG = "tokenizer_config.json"


def load_tokenizer(name: str):
    """A tokenizer by name: "byte" or "o200k_harmony"."""
    if name not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {name!r}; choose from {sorted(TOKENIZERS)}")
    return TOKENIZERS[name]()


def byte_level_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, which transformers' ``ByteLevel``
    pre-tokenizer and decoder use: printable Latin-1 bytes map to themselves, the rest to 256+."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


def byte_tokenizer_json() -> dict:
    """``ByteTokenizer`` as a Hugging Face ``tokenizer.json``: a BPE model without merges over the
    256 byte characters (id = byte value) plus ``<|endoftext|>`` = 256, so that
    ``AutoTokenizer.from_pretrained(DIR)`` encodes and decodes exactly as ``ByteTokenizer`` does."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": ByteTokenizer.eos_token_id, "content": ENDOFTEXT, "single_word": False,
                          "lstrip": False, "rstrip": False, "normalized": False, "special": True}],
        "normalizer": None, "pre_tokenizer": byte_level, "post_processor": None, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {char: byte for byte, char in byte_level_unicode().items()}, "merges": []},
    }


def save_tokenizer_name(directory: str | Path, name: str) -> None:
    """Record which tokenizer a ``save_pretrained`` directory's model was trained with. For "byte"
    also write ``tokenizer.json``, so ``transformers.AutoTokenizer.from_pretrained(directory)`` loads
    it (``tokenizer_config.json`` names ``PreTrainedTokenizerFast``; our key is ``tokenizer``)."""
    load_tokenizer(name)  # validate
    config = {"tokenizer": name}
    if name == "byte":
        (Path(directory) / "tokenizer.json").write_text(json.dumps(byte_tokenizer_json(), ensure_ascii=False))
        config.update(tokenizer_class="PreTrainedTokenizerFast", eos_token=ENDOFTEXT)
    (Path(directory) / TOKENIZER_CONFIG).write_text(json.dumps(config) + "\n")


def tokenizer_for(directory: str | Path, vocab_size: int):
    """The tokenizer recorded in ``directory``; without a record, byte-level for a 257-token
    vocabulary and o200k_harmony otherwise."""
    path = Path(directory) / TOKENIZER_CONFIG
    if path.is_file():
        record = read_json(path)
        if record.get("tokenizer") not in TOKENIZERS:
            raise ValueError(f"{path}: \"tokenizer\" must be one of {sorted(TOKENIZERS)}, "
                             f"got {record.get('tokenizer')!r}")
        tokenizer = load_tokenizer(record["tokenizer"])
    else:
        tokenizer = ByteTokenizer() if vocab_size <= ByteTokenizer.vocab_size else MythosTokenizer()
    check_vocab_covered(vocab_size, tokenizer)
    return tokenizer


"""Tokenizers.

``MythosTokenizer``: gpt-oss-20b's ``o200k_harmony`` encoding (vocab 201,088), built offline with
tiktoken. The o200k_base BPE ranks come from the ``bpe-openai`` package (``o200k_base.tiktoken.gz``),
checked against the sha256 that tiktoken expects; pattern and harmony special tokens are tiktoken's
own definitions. ``MythosTokenizer.from_hub()`` uses the Hugging Face tokenizer instead, on request.

``ByteTokenizer``: UTF-8 bytes (256 ids) + ``<|endoftext|>``, for tiny models and tests.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import importlib.util
import json
from functools import lru_cache
from pathlib import Path
from unittest import mock

import tiktoken
from tiktoken_ext import openai_public

from .checks import check_int, read_json

O200K_BASE_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
ENDOFTEXT = "<|endoftext|>"


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

    def __init__(self) -> None:
        self.encoding = o200k_harmony_encoding()

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    @property
    def eos_token_id(self) -> int:
        return self.encoding.encode_single_token(ENDOFTEXT)

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        return self.encoding.encode(text, allowed_special="all" if allow_special else set(),
                                    disallowed_special=())

    def decode(self, ids: list[int]) -> str:
        ids = check_decode_ids(ids, self.vocab_size)
        try:
            return self.encoding.decode(ids)
        except KeyError as err:  # a hole in the id range: ids the encoding does not define
            raise ValueError(f"token id {err.args[0]} is not in the o200k_harmony vocabulary") from None

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        """Harmony format: <|start|>{role}<|message|>{content}<|end|> ... <|start|>assistant<|message|>."""
        text = "".join(f"<|start|>{m['role']}<|message|>{m['content']}<|end|>" for m in messages)
        return self.encode(text + "<|start|>assistant<|message|>", allow_special=True)

    @property
    def chat_stop_token_ids(self) -> tuple[int, ...]:
        """Tokens that end an assistant turn."""
        return tuple(self.encoding.encode_single_token(t) for t in ("<|end|>", "<|return|>", ENDOFTEXT))

    @staticmethod
    def from_hub(name: str = "openai/gpt-oss-20b"):
        """The Hugging Face tokenizer for ``name`` (needs ``transformers`` and network access)."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(name)


class ByteTokenizer:
    """Byte-level tokenizer: ids 0..255 are UTF-8 bytes, 256 is ``<|endoftext|>``."""

    vocab_size = 257
    eos_token_id = 256

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        if allow_special and ENDOFTEXT in text:
            parts = text.split(ENDOFTEXT)
            ids: list[int] = []
            for i, part in enumerate(parts):
                ids += ([self.eos_token_id] if i else []) + list(part.encode("utf-8"))
            return ids
        return list(text.encode("utf-8"))

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        """<|role|>\ncontent\n per message, then <|assistant|>\n; the reply ends at <|endoftext|>."""
        text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)
        return self.encode(text + "<|assistant|>\n")

    @property
    def chat_stop_token_ids(self) -> tuple[int, ...]:
        return (self.eos_token_id,)

    def decode(self, ids: list[int]) -> str:
        out = bytearray()
        for i in check_decode_ids(ids, self.vocab_size):
            if i == self.eos_token_id:
                out += ENDOFTEXT.encode()
            else:
                out.append(i)
        return out.decode("utf-8", errors="replace")


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


def save_tokenizer_name(directory: str | Path, name: str) -> None:
    """Record which tokenizer a ``save_pretrained`` directory's model was trained with."""
    load_tokenizer(name)  # validate
    (Path(directory) / TOKENIZER_CONFIG).write_text(json.dumps({"tokenizer": name}) + "\n")


def tokenizer_for(directory: str | Path, vocab_size: int):
    """The tokenizer recorded in ``directory``; without a record, byte-level for a 257-token
    vocabulary and o200k_harmony otherwise."""
    path = Path(directory) / TOKENIZER_CONFIG
    if path.is_file():
        record = read_json(path)
        if record.get("tokenizer") not in TOKENIZERS:
            raise ValueError(f"{path}: \"tokenizer\" must be one of {sorted(TOKENIZERS)}, got {record.get('tokenizer')!r}")
        return load_tokenizer(record["tokenizer"])
    return ByteTokenizer() if vocab_size <= ByteTokenizer.vocab_size else MythosTokenizer()


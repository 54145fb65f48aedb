"""Checks of user-given values, written once: each raises ``ValueError`` naming the argument (or file)
and the problem, before the value reaches torch, where it would fail deep inside a kernel or not at all.
"""

from __future__ import annotations

import json
import math
import numbers
from pathlib import Path
from typing import Any

import torch

TOKEN_ID_DTYPES = (torch.int64, torch.int32)  # what nn.Embedding and indexing accept
SEED_RANGE = (-2 ** 63, 2 ** 64 - 1)          # what torch.Generator.manual_seed takes


def check_int(name: str, value: Any, lo: int | None = None, hi: int | None = None, hi_name: str = "",
              note: str = "") -> int:
    """``value`` as an int in [lo, hi] (either bound optional); bool is not an int here, numpy's ints are.
    ``hi_name`` names the upper bound in the message ("[1, max_batch=4]"); ``note`` explains the range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        high = "inf" if hi is None else f"{hi_name}={hi}" if hi_name else hi
        bounds = f"[{'-inf' if lo is None else lo}, {high}]"
        raise ValueError(f"{name} {value} is out of range {bounds}{f' ({note})' if note else ''}")
    return int(value)


def check_prompt_length(prompt_len: int, context: int, context_name: str = "") -> None:
    """A prompt leaves room in ``context`` tokens for at least one new token (``context_name`` says where that
    limit comes from)."""
    if prompt_len >= context:
        raise ValueError(f"prompt of {prompt_len} tokens is too long: the context holds {context}"
                         f"{f' ({context_name})' if context_name else ''}")


def check_generation_length(prompt_len: int, max_new_tokens: Any, max_output_tokens: int, context: int,
                            context_name: str = "") -> None:
    """A generation request's length limits (``OpenMythos.generate``, the inference engine, the server):
    the prompt shorter than ``context`` (:func:`check_prompt_length`), max_new_tokens an int in
    [1, max_output_tokens], and prompt + max_new_tokens within ``context`` tokens (``context_name`` says
    where that limit comes from)."""
    check_prompt_length(prompt_len, context, context_name)
    check_int("max_new_tokens", max_new_tokens, 1)
    if max_new_tokens > max_output_tokens:
        raise ValueError(f"max_new_tokens={max_new_tokens} exceeds max_output_tokens={max_output_tokens}")
    if prompt_len + max_new_tokens > context:
        raise ValueError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the context "
                         f"of {context} tokens{f' ({context_name})' if context_name else ''}")


def check_token_id(name: str, value: Any, vocab_size: int) -> int:
    """One token id (an end-of-sequence id): an int in [0, vocab_size)."""
    return check_int(name, value, 0, vocab_size - 1, hi_name="vocab_size-1")


def check_seed(value: Any) -> int:
    """A sampling seed: an int in ``SEED_RANGE``."""
    return check_int("seed", value, *SEED_RANGE, note="torch.Generator.manual_seed's range")


# dtype names users type (CLI --dtype, lm-eval's dtype=...): the short and the torch spellings
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(name: str, argument: str = "dtype") -> torch.dtype:
    """The torch dtype called ``name`` (a key of DTYPES); else ValueError naming ``argument``."""
    if name not in DTYPES:
        raise ValueError(f"{argument} must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def parse_device(name: str, argument: str = "device") -> torch.device:
    """The torch device called ``name`` ("cpu", "cuda", "cuda:1", ...); ValueError naming ``argument`` when torch
    does not know the name or this machine lacks the CUDA device."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device is None or (device.type == "cuda" and (device.index or 0) >= count):
        have = ", ".join(["cpu", *(f"cuda:{i}" for i in range(count))])
        raise ValueError(f"{argument} must be a torch device this machine has ({have}), got {name!r}")
    return device


def check_finite(name: str, value: Any) -> float:
    """``value`` as a finite float (an int is accepted)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        value = float(value)
    except OverflowError:  # an int beyond the float range
        value = math.inf
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_token_ids(name: str, ids: Any, vocab_size: int, device: torch.device | None = None) -> None:
    """``ids``: a non-empty (batch, seq_len) int64/int32 tensor of ids in [0, vocab_size) (on ``device``).

    The range check reads the tensor on the host; it is skipped while compiling or capturing a CUDA graph."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise ValueError(f"{name} must be a (batch, seq_len) tensor of token ids, got "
                         f"{tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__}")
    if ids.dtype not in TOKEN_ID_DTYPES:
        raise ValueError(f"{name} must be an integer tensor (int64 or int32), got {ids.dtype}")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(ids.shape)}): need at least one row of one token")
    if device is not None and ids.device != device:
        raise ValueError(f"{name} is on {ids.device}, the model on {device}")
    check_index_range(name, ids, vocab_size, "token id")


def check_token_list(name: str, ids: Any, vocab_size: int) -> None:
    """``ids``: a non-empty list (or tuple) of int token ids in [0, vocab_size): a request's prompt, the list
    form of :func:`check_token_ids` (same messages for the same problem)."""
    if not isinstance(ids, (list, tuple)):
        raise ValueError(f"{name} must be a list of token ids (ints), got {type(ids).__name__}")
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
            raise ValueError(f"{name} must be a list of token ids (ints), got an element {i!r}")
    if len(ids) == 0:
        raise ValueError(f"{name} is empty: need at least one token")
    _check_bounds(name, min(ids), max(ids), vocab_size, "token id")


def check_index_range(name: str, index: torch.Tensor, bound: int, what: str = "value") -> None:
    """Every entry of the integer tensor ``index`` in [0, bound); skipped while compiling or capturing.
    ``what`` names one entry in the message ("token id", "position")."""
    if torch.compiler.is_compiling() or (index.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    _check_bounds(name, int(index.min()), int(index.max()), bound, what)


def _check_bounds(name: str, lo: int, hi: int, bound: int, what: str) -> None:
    """Values from ``lo`` to ``hi`` within [0, bound); else ValueError naming the first one outside."""
    if lo < 0 or hi >= bound:
        raise ValueError(f"{name}: {what} {lo if lo < 0 else hi} is out of range [0, {bound})")


def read_json(path: str | Path, kind: type = dict) -> Any:
    """The JSON document in ``path``, which must be a ``kind`` (dict: an object); ValueError naming the
    file otherwise (missing, invalid JSON, or another type)."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(value, kind):
        expected = "a JSON object" if kind is dict else f"a JSON {kind.__name__}"
        raise ValueError(f"{path}: expected {expected}, got {type(value).__name__}")
    return value

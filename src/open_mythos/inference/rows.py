"""Row KV cache: the inference engine's static cache, one row per running request (formerly "slot").

Every attention call site owns buffers of shape ``(n_rows, loop_slots, max_len, ...)``, allocated
once and written in place, so a decode step has fixed shapes (CUDA-graph friendly) whatever the
prompt lengths. Rows sit at different positions: a decode step *binds* the rows it runs, each
row's position and (for the recurrent block) each row's loop slot, and attention reads the row's
whole buffer with the mask ``key position <= query position``. Stale entries of an earlier request
in the same row lie beyond the position and are masked out, so freeing a row costs nothing.
The last row is the engine's scratch row: padding rows of a bucket point at it, and a decode
step sends the writes it must skip there, so that every write is one scatter.

Loop slots of the recurrent block (``loop_slots`` = engine max loops for ``per_loop``, 1 for
``shared``): a write at loop t fills slots t..L-1 ("fill forward"). With a fixed depth this is
exact (loop t+1 overwrites t+1..L-1 next); when a token exits early at depth d, later tokens that
run deeper read its deepest computed keys (loop d-1) at every loop >= d.
"""

from __future__ import annotations

import torch

from ..cache import LOOP_POLICIES, buffer_bytes


class RowKVCache:
    def __init__(self, n_rows: int, max_len: int, loop_policy: str, max_loop_budget: int):
        if loop_policy not in LOOP_POLICIES:
            raise ValueError(f"loop_policy must be one of {LOOP_POLICIES}, got {loop_policy!r}")
        self.n_rows, self.max_len, self.loop_policy = n_rows, max_len, loop_policy
        self.loop_slots = max_loop_budget if loop_policy == "per_loop" else 1
        self._buffers: dict[tuple, dict[str, torch.Tensor]] = {}
        self.pos = 0        # attention's `start`; unused when `mask` is set
        self.mask = None    # (B, 1, T, max_len) bool while a decode step is bound
        self._rows = self._positions = self._loop_slot = self._write = None
        self._prefill_rows: torch.Tensor | None = None

    # ------------------------------------------------------------------------------ binding
    def bind(self, rows: torch.Tensor, positions: torch.Tensor, loop_slot: torch.Tensor,
             write: torch.Tensor) -> None:
        """Set up a one-token decode step: rows (B,), positions (B,), recurrent loop slot per row
        (B,), write (B,) bool (False: the row reads but leaves the cache unchanged)."""
        self._rows, self._positions, self._write = rows, positions, write
        self._loop_slot = loop_slot if self.loop_policy == "per_loop" else torch.zeros_like(loop_slot)
        keys = torch.arange(self.max_len, device=rows.device)
        self.mask = (keys <= positions[:, None])[:, None, None, :]
        self._prefill_rows = None

    def bind_prefill(self, rows: torch.Tensor) -> "RowKVCache":
        """Set up a prompt forward from position 0 for the rows ``rows`` (B,), used as
        ``model(ids, cache=...)``: causal attention over the prompts, loop t written to loop slots
        t.. (fill forward). Prompts shorter than ids may be right-padded: a padding position's
        entries lie beyond the prompt, where decoding overwrites them before anything reads them."""
        self._prefill_rows, self.pos, self.mask = rows, 0, None
        return self

    def loop_key(self, loop_index: int) -> tuple:
        return ("recurrent", loop_index)

    def advance(self, n_tokens: int) -> None:
        """Called by ``OpenMythos.forward``; positions are tracked by the engine."""

    # ------------------------------------------------------------------------------ read/write
    def _buffer(self, key: tuple, name: str, value: torch.Tensor) -> torch.Tensor:
        site = self._buffers.setdefault(key[0] if key[0] == "recurrent" else key, {})
        buf = site.get(name)
        if buf is None:
            depth = self.loop_slots if key[0] == "recurrent" else 1
            buf = site[name] = value.new_zeros((self.n_rows, depth, self.max_len, *value.shape[2:]))
        return buf

    def update(self, key: tuple, **new: torch.Tensor) -> dict[str, torch.Tensor]:
        """Write ``new[name]`` at the bound rows/positions; return each row's readable keys."""
        recurrent = key[0] == "recurrent"
        out = {}
        for name, value in new.items():
            buf = self._buffer(key, name, value)
            if self._prefill_rows is not None:
                rows, T = self._prefill_rows, value.shape[1]
                ls = min(key[1], self.loop_slots - 1) if recurrent and self.loop_policy == "per_loop" else 0
                buf[rows, ls:, :T] = value.unsqueeze(1).to(buf.dtype)
                out[name] = value  # a prefill attends to its own keys only
                continue
            rows, pos = self._rows, self._positions
            ls = self._loop_slot if recurrent else torch.zeros_like(rows)
            loop_slots = torch.arange(buf.shape[1], device=rows.device)
            fill = (loop_slots >= ls[:, None]) & self._write[:, None]                # (B, depth)
            # one scatter; entries that must not change go to the scratch row's (the last row's)
            # position 0, which only padding rows ever read. index_put_ on the buffer itself: compiled,
            # index_copy_ into a flattened view of it copied the whole buffer (benchmarks/cache_write.py)
            index = (torch.where(fill, rows[:, None], self.n_rows - 1), torch.where(fill, loop_slots, 0),
                     torch.where(fill, pos[:, None], 0))
            buf.index_put_(index, value.expand(-1, buf.shape[1], *value.shape[2:]).to(buf.dtype))
            out[name] = buf[rows, ls]                                             # (B, max_len, ...)
        return out

    # ------------------------------------------------------------------------------ accounting
    def nbytes(self) -> int:
        return buffer_bytes(self._buffers)

    def bytes_per_token(self) -> float:
        """Cache memory per token position of one request (all layers and loop slots)."""
        return self.nbytes() / (self.n_rows * self.max_len)

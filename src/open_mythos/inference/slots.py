"""Deprecated module name: the engine's cache is :class:`open_mythos.inference.rows.RowKVCache` (an engine
"slot" is now called a row; "loop slot" keeps its meaning: a cache entry per loop iteration)."""

import warnings

from .rows import RowKVCache


class _SlotKVCache(RowKVCache):
    """``RowKVCache`` under its old name and spellings: ``n_slots`` (now ``n_rows``), as argument and attribute."""

    def __init__(self, n_slots: int, max_len: int, loop_policy: str, max_loop_budget: int):
        super().__init__(n_slots, max_len, loop_policy, max_loop_budget)

    @property
    def n_slots(self) -> int:
        return self.n_rows


def __getattr__(name: str):
    if name == "SlotKVCache":
        warnings.warn("open_mythos.inference.slots.SlotKVCache is now open_mythos.inference.rows.RowKVCache "
                      "(n_slots is now n_rows)", DeprecationWarning, stacklevel=2)
        return _SlotKVCache
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Deprecated module name: the engine's cache is :class:`open_mythos.inference.rows.RowKVCache` (an engine
"slot" is now called a row; "loop slot" keeps its meaning: a cache entry per loop iteration)."""

import warnings

from .rows import RowKVCache


def __getattr__(name: str):
    if name == "SlotKVCache":
        warnings.warn("open_mythos.inference.slots.SlotKVCache is now open_mythos.inference.rows.RowKVCache",
                      DeprecationWarning, stacklevel=2)
        return RowKVCache
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

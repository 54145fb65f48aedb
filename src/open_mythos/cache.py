"""Static key/value cache for incremental decoding.

One ``KVCache`` serves a whole model. Every attention call site (a Prelude layer, a Coda layer,
or the recurrent block at one loop iteration) owns named buffers of shape ``(B, max_len, ...)``
that are allocated once, on first write, and then written in place by position: nothing grows
per step. GQA stores ``k``/``v``; MLA stores only the compressed latent ``c_kv`` and the shared
rotary key ``k_pe``.

Loop policy for the recurrent block:

* ``"per_loop"``: one slot per loop iteration t. Exact: decoding token by token gives the same
  logits as a full forward. Memory grows linearly with the loop count.
* ``"shared"``: one slot for all iterations; each loop overwrites the token's entry, so later
  tokens attend to the *last* loop's keys of earlier tokens. Memory independent of loop count;
  an approximation (recurrent-depth LMs that share the cache report a small quality cost).
"""

from __future__ import annotations

import torch

LOOP_POLICIES = ("per_loop", "shared")


def buffer_bytes(buffers: dict[tuple, dict[str, torch.Tensor]]) -> int:
    """Bytes held by a cache's {call site: {name: tensor}} buffers."""
    return sum(t.numel() * t.element_size() for slot in buffers.values() for t in slot.values())


class KVCache:
    def __init__(self, batch_size: int, max_len: int, loop_policy: str = "per_loop"):
        if loop_policy not in LOOP_POLICIES:
            raise ValueError(f"loop_policy must be one of {LOOP_POLICIES}, got {loop_policy!r}")
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"batch_size and max_len must be >= 1, got {batch_size}, {max_len}")
        self.batch_size = batch_size
        self.max_len = max_len
        self.loop_policy = loop_policy
        self.pos = 0  # number of tokens whose keys/values are committed
        self.mask = None  # attention uses the causal rule from `pos` (see attention.attend)
        self._buffers: dict[tuple, dict[str, torch.Tensor]] = {}

    def loop_key(self, loop_index: int) -> tuple:
        """Cache key of the recurrent block at loop iteration ``loop_index``."""
        return ("recurrent", loop_index if self.loop_policy == "per_loop" else 0)

    def update(self, key: tuple, **new: torch.Tensor) -> dict[str, torch.Tensor]:
        """Write ``new[name]`` (B, T, ...) at positions [pos, pos+T); return views of [0, pos+T)."""
        T = next(iter(new.values())).shape[1]
        end = self.pos + T
        if end > self.max_len:
            raise ValueError(f"cache overflow: {end} tokens exceed the cache length {self.max_len}")
        slot = self._buffers.setdefault(key, {})
        out = {}
        for name, value in new.items():
            buf = slot.get(name)
            if buf is None:
                buf = slot[name] = value.new_zeros((self.batch_size, self.max_len, *value.shape[2:]))
            buf[:, self.pos:end] = value
            out[name] = buf[:, :end]
        return out

    def advance(self, n_tokens: int) -> None:
        """Commit ``n_tokens`` written by the last forward; called once per model forward."""
        self.pos += n_tokens

    def nbytes(self) -> int:
        return buffer_bytes(self._buffers)

    def bytes_per_token(self) -> float:
        """Cache memory per token position (all layers and loop slots, whole batch row)."""
        return self.nbytes() / (self.batch_size * self.max_len)

"""Fixed shapes for the engine's stages: batches padded to a few bucket sizes, prompts to power-of-two
lengths, so that a handful of shapes covers every workload and each is one CUDA graph (graphs.py)."""

from __future__ import annotations

import torch


def batch_buckets(max_batch: int) -> list[int]:
    """Padded batch sizes: powers of two below ``max_batch``, and ``max_batch``."""
    return sorted({min(2 ** i, max_batch) for i in range(max_batch.bit_length() + 1)})


def bucket_len(n: int) -> int:
    """Prompt lengths are padded to powers of two (>= 16)."""
    return max(16, 1 << (n - 1).bit_length())


class RowIndex:
    """Row-index tensors of lists of rows, padded with the scratch row to a batch bucket (cached)."""

    def __init__(self, buckets: list[int], scratch: int, device: torch.device, max_cached: int = 4096):
        self.buckets, self.scratch, self.device, self.max_cached = buckets, scratch, device, max_cached
        self._tensors: dict[tuple, torch.Tensor] = {}

    def bucket(self, n: int) -> int:
        """The padded batch size for n rows."""
        return next(b for b in self.buckets if b >= n)

    def __call__(self, rows: list[int]) -> torch.Tensor:
        key = tuple(rows)
        if key not in self._tensors:
            if len(self._tensors) >= self.max_cached:  # subsets of rows are many: a long-running server must not grow
                self._tensors.clear()
            pad = [self.scratch] * (self.bucket(len(rows)) - len(rows))
            self._tensors[key] = torch.tensor(rows + pad, device=self.device)
        return self._tensors[key]

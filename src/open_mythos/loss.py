"""The training objective: next-token cross-entropy (used by the trainer, evaluation and the transformers wrapper)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100  # label of a position without a target (cross-entropy's ignore_index)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32 of logits (B, T, vocab) against labels (B, T); label -100 is
    ignored (e.g. prompt tokens)."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE)

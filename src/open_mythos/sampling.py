"""Next-token sampling: greedy, temperature, top-k and nucleus (top-p) filtering.

A temperature below the smallest normal float32 (``GREEDY_BELOW``, ~1.2e-38) is greedy: the logits
are fp32, where such a T rounds towards 0 and 1/T overflows, and the distribution it stands for is
the argmax anyway."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .checks import check_finite, check_int

GREEDY_BELOW = torch.finfo(torch.float32).tiny


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 (or below GREEDY_BELOW) = greedy
    top_k: int = 0            # 0 = off
    top_p: float = 1.0        # 1 = off

    def __post_init__(self) -> None:
        if not 0 <= check_finite("temperature", self.temperature):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        check_int("top_k", self.top_k, 0, note="0 = off")
        if not 0.0 < check_finite("top_p", self.top_p) <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        """Whether sampling is the argmax (temperature 0 or below ``GREEDY_BELOW``)."""
        return self.temperature < GREEDY_BELOW


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Scale by 1/temperature and set the logits outside top-k / the top-p nucleus to -inf.

    The logits are shifted by their row maximum before the division (softmax is shift-invariant):
    (l - max l) / T is <= 0 and at most -inf, never NaN, so any temperature > 0, however tiny, gives
    a valid distribution; as T -> 0 it tends to the argmax (greedy), which a tiny T then samples."""
    logits = logits.float()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass
        drop = (probs.cumsum(-1) - probs) >= params.top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, params: SamplingParams,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row of ``logits`` (B, vocab) -> (B,)."""
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, params).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

"""The public OpenMythos prototype's names, bound to this library's equivalents.

``from open_mythos.main import OpenMythos, MythosConfig`` (the quickstart) and the prototype's building
blocks import from here. Classes and functions whose signatures match are our own objects; the rest are
thin adapters with the prototype's signature (docs/architecture.md has the table):

* ``precompute_rope_freqs(dim, max_len, theta)`` -> complex (max_len, dim/2) phasors; ours computes
  (cos, sin) on the fly (``layers.rope_angles``).
* ``apply_rope(x, freqs_cis)`` also accepts the prototype's complex phasors; ours takes (x, cos, sin).
* ``loop_index_embedding(h, loop_t, loop_dim, theta)`` returns h plus the sinusoid of loop_t on the first
  loop_dim channels; ours precomputes a table (``recurrence.loop_embeddings``, amplitude
  ``loop_embed_scale``).
* ``LoRAAdapter(dim, rank, max_loops)``: our ``DepthLoRA`` with its norm eps and init std defaulted.
* ``ACTHalting(dim, threshold=0.99)``: calling it returns the halting probabilities (ours: ``halting_prob``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import GQAttention, MLAttention
from .blocks import TransformerBlock
from .config import MythosConfig
from .layers import RMSNorm, rope_angles, sinusoid
from .layers import SwiGLU as Expert
from .layers import apply_rope as _apply_rope
from .model import OpenMythos
from .moe import MoE as MoEFFN
from .recurrence import ACTHalting as _ACTHalting
from .recurrence import DepthLoRA, LTIInjection, RecurrentBlock

__all__ = ["ACTHalting", "Expert", "GQAttention", "LTIInjection", "LoRAAdapter", "MLAttention", "MoEFFN",
           "MythosConfig", "OpenMythos", "RMSNorm", "RecurrentBlock", "TransformerBlock", "apply_rope",
           "loop_index_embedding", "precompute_rope_freqs"]


def precompute_rope_freqs(dim: int, max_len: int, theta: float = 500000.0) -> torch.Tensor:
    """exp(i p theta^(-2k/dim)) for positions p < max_len and k < dim/2: complex64 (max_len, dim/2)."""
    cos, sin = rope_angles(torch.arange(max_len), dim, theta)
    return torch.complex(cos, sin)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate x (B, T, H, d) by RoPE: ``apply_rope(x, freqs_cis)`` with complex (T, d/2) phasors (the
    prototype's form) or ``apply_rope(x, cos, sin)`` (ours)."""
    if sin is None:
        cos, sin = cos.real, cos.imag
    return _apply_rope(x, cos, sin)


def loop_index_embedding(h: torch.Tensor, loop_t: int, loop_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """h (..., dim) + [sin(t w_k), cos(t w_k)] on its first loop_dim channels, w_k = theta^(-2k/loop_dim)."""
    emb = sinusoid(torch.tensor([loop_t], device=h.device), loop_dim, theta)[0]
    return h + F.pad(emb, (0, h.shape[-1] - loop_dim)).to(h.dtype)


class LoRAAdapter(DepthLoRA):
    """``DepthLoRA`` with the prototype's signature: one (down, up) pair per loop index < max_loops."""

    def __init__(self, dim: int, rank: int, max_loops: int, eps: float = 1e-6, std: float = 0.02):
        super().__init__(dim, rank, max_loops, eps, std)


class ACTHalting(_ACTHalting):
    """``recurrence.ACTHalting`` whose call returns the halting probabilities (B, T), as the prototype's."""

    def __init__(self, dim: int, threshold: float = 0.99):
        super().__init__(dim, threshold)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.halting_prob(h)

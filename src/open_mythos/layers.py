"""Small building blocks shared by every stage: RMSNorm, rotary embeddings, SwiGLU, sinusoids, and
the Linear layer with a decode-friendly single-row path.

All of them compute their sensitive parts (normalisation statistics, angles) in fp32 and return
the input dtype, so a model cast to bf16 with ``model.to(torch.bfloat16)`` stays in bf16.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on ``x`` run in: the autocast dtype inside an autocast region, else x's."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def matvec(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """y[..., n] = sum_k x[..., k] w[..., n, k]: one row of x per weight matrix (w broadcasts).

    Decoding one token makes every matmul a single row: cuBLAS runs it as a GEMV over a few thread
    blocks, leaving most of the GPU idle. Under torch.compile it is written as a broadcast multiply
    and an fp32 sum, which inductor turns into one reduction kernel spread over the whole GPU that
    also reads a gathered ``w`` in place (faster for one row; benchmarks/decode_kernels.py).
    Eager: a batched matmul.
    """
    if torch.compiler.is_compiling():
        return (x.unsqueeze(-2).float() * w.float()).sum(-1).to(x.dtype)
    return (x.unsqueeze(-2) @ w.mT).squeeze(-2)


class Linear(nn.Linear):
    """nn.Linear whose single-row calls under torch.compile (decoding one token) use :func:`matvec`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() != x.shape[-1] or not torch.compiler.is_compiling():
            return F.linear(x, self.weight, self.bias)
        dtype = compute_dtype(x)
        y = matvec(x.to(dtype), self.weight.to(dtype))
        return y if self.bias is None else y + self.bias.to(dtype)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight   (statistics in fp32)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def rope_angles(positions: torch.Tensor, rot_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of angle p * theta^(-2i/d) for each position p and frequency i < d/2; fp32.

    ``positions``: integer tensor of any shape S; returns two tensors of shape S + (d/2,).
    Computed on the fly (no buffer), so no dtype cast of the module can degrade the angles.
    """
    inv_freq = theta ** (-torch.arange(0, rot_dim, 2, device=positions.device, dtype=torch.float32) / rot_dim)
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (x_{2i}, x_{2i+1}) by the position angle.

    ``x``: (B, T, H, d); ``cos``/``sin``: (T, d/2) or (B, T, d/2).
    """
    if cos.dim() == 2:
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    else:
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)


def sinusoid(indices: torch.Tensor, dim: int, base: float = 10000.0) -> torch.Tensor:
    """Transformer sinusoidal embeddings of indices (n,) -> (n, dim): [sin(i w_k), cos(i w_k)],
    w_k = base^(-2k/d), zero-padded to ``dim``; fp32."""
    half = dim // 2
    freqs = base ** (-torch.arange(half, device=indices.device, dtype=torch.float32) / max(half, 1))
    angles = indices.to(torch.float32).unsqueeze(-1) * freqs
    emb = torch.cat((angles.sin(), angles.cos()), dim=-1)
    return F.pad(emb, (0, dim - emb.shape[-1]))


class SwiGLU(nn.Module):
    """FFN(x) = W2 (silu(W1 x) * W3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = Linear(dim, hidden, bias=False)
        self.w3 = Linear(dim, hidden, bias=False)
        self.w2 = Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def scaled_init_std(base_std: float, n_residual_writes: int) -> float:
    """GPT-2 style std for projections that write into the residual stream: std / sqrt(2 n)."""
    return base_std / math.sqrt(2 * max(n_residual_writes, 1))

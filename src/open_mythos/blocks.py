"""The pre-norm transformer block used by every stage.

    u = x + Attn(norm1(x));   y = u + FFN(norm2(u))
    u = x + norm3(Attn(norm1(x)));   y = u + norm4(FFN(norm2(u)))     (sandwich_norm: Huginn's sandwich format)

Prelude and Coda blocks use a dense SwiGLU FFN; the recurrent block uses the MoE FFN.
:meth:`TransformerBlock.residual` returns ``y - x`` — the ``Transformer(h_t, e)`` term of the
recurrent update — so the recurrent block can combine it with its own LTI injection.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import build_attention
from .cache import KVCache
from .config import MythosConfig
from .layers import RMSNorm, SwiGLU
from .moe import MoE


class TransformerBlock(nn.Module):
    def __init__(self, cfg: MythosConfig, use_moe: bool = False, sandwich_norm: bool = False):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = build_attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = MoE(cfg) if use_moe else SwiGLU(cfg.dim, cfg.ffn_dim)
        self.dropout = nn.Dropout(cfg.dropout)
        # sandwich_norm: RMSNorm on each sub-layer's output before it joins the stream, so what a block adds has
        # the norms' scale whatever its weights do (used in the recurrent block: cfg.sandwich_norm)
        self.attn_out_norm = RMSNorm(cfg.dim, cfg.norm_eps) if sandwich_norm else nn.Identity()
        self.ffn_out_norm = RMSNorm(cfg.dim, cfg.norm_eps) if sandwich_norm else nn.Identity()

    def residual(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                 cache: KVCache | None = None, cache_key: tuple | None = None) -> torch.Tensor:
        """Block(x) - x: what the block adds to the residual stream."""
        a = self.dropout(self.attn_out_norm(self.attn(self.attn_norm(x), rope, cache, cache_key)))
        return a + self.dropout(self.ffn_out_norm(self.ffn(self.ffn_norm(x + a))))

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                cache: KVCache | None = None, cache_key: tuple | None = None) -> torch.Tensor:
        return x + self.residual(x, rope, cache, cache_key)

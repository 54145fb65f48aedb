"""Fixed-depth baselines for the experiments: a plain dense transformer built from the same parts.

    logits = head(norm(Block_L(... Block_1(embed(ids)))))     Block = TransformerBlock (dense SwiGLU)

Same attention, norms, RoPE and FFN type as OpenMythos's Prelude/Coda blocks, no loop, no MoE.
"""

from __future__ import annotations

import torch
from torch import nn

from ..blocks import TransformerBlock
from ..config import MythosConfig
from ..layers import RMSNorm, rope_angles


class DenseTransformer(nn.Module):
    def __init__(self, cfg: MythosConfig, n_layers: int):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=cfg.init_std)

    def forward(self, input_ids: torch.Tensor, n_loops: int | None = None) -> torch.Tensor:
        """n_loops is accepted and ignored, so evaluation code can treat both models alike."""
        rope = rope_angles(torch.arange(input_ids.shape[1], device=input_ids.device), self.cfg.rope_dim,
                           self.cfg.rope_theta)
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x, rope)
        return self.head(self.norm(x))


def matched_dense_layers(cfg: MythosConfig, target_params: int) -> int:
    """The layer count whose DenseTransformer has the parameter count closest to ``target_params``."""
    with torch.device("meta"):
        base = sum(p.numel() for p in DenseTransformer(cfg, 0).parameters())
        per_block = sum(p.numel() for p in TransformerBlock(cfg).parameters())
    return max(1, round((target_params - base) / per_block))

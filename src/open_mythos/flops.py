"""Model FLOPs per token, with the loops and attention counted, for MFU reporting.

Forward FLOPs per token, for a sequence of T tokens run with L loops:

    F_fwd = 2 * (P_stages + L * P_loop + P_head)                      matmul weights
          + (n_prelude + n_coda + L) * 2 * H * (d_qk + d_v) * (T + 1) / 2   causal attention scores

* P_stages: matmul weights of the Prelude and Coda blocks (attention projections + dense FFN)
* P_loop:   weights a token touches in one recurrent iteration: attention projections, router,
            shared experts, k of the E routed experts, one depth-wise LoRA adapter, the injection's B where it is a
            full matrix (``injection="parcae"``)
* P_head:   the LM head (vocab x dim); the embedding lookup costs no FLOPs
* attention: q.k and p.v for H heads over on average (T+1)/2 keys (causal)

Training FLOPs = 3 * F_fwd (backward = 2 x forward), the usual MFU convention (recomputation from
activation checkpointing is not counted as useful work).
"""

from __future__ import annotations

import torch

from .config import MythosConfig
from .model import OpenMythos


def _matmul_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for name, p in module.named_parameters() if p.ndim >= 2)


def flops_per_token(cfg: MythosConfig, seq_len: int, n_loops: int, training: bool = True) -> float:
    with torch.device("meta"):
        model = OpenMythos(cfg)
    stages = sum(_matmul_params(b) for b in [*model.prelude, *model.coda])
    ffn = model.recurrent.block.ffn  # routed experts: k of E run per token; a dense FFN (recurrent_ffn) runs whole
    routed = ffn.w1.numel() + ffn.w2.numel() + ffn.w3.numel() if cfg.recurrent_ffn == "moe" else 0
    loop = (_matmul_params(model.recurrent.block) - routed + routed * cfg.n_experts_per_tok // cfg.n_experts
            + (_matmul_params(model.recurrent.lora) // cfg.max_loop_iters  # one loop's adapter of the stack
               if model.recurrent.lora is not None else 0)
            + _matmul_params(model.recurrent.injection))  # injection="parcae": the full B (dim, dim)
    head = cfg.vocab_size * cfg.dim
    if cfg.attn_type == "mla":
        d_qk, d_v = cfg.qk_head_dim, cfg.v_head_dim
    else:
        d_qk = d_v = cfg.head_dim
    n_attn = cfg.prelude_layers + cfg.coda_layers + n_loops
    attention = n_attn * 2 * cfg.n_heads * (d_qk + d_v) * (seq_len + 1) / 2
    forward = 2 * (stages + n_loops * loop + head) + attention
    return 3 * forward if training else forward


# dense bf16 tensor-core peaks (FLOP/s), for MFU
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops(device: torch.device | str) -> float | None:
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)

"""Fine-grained mixture of experts (DeepSeekMoE / DeepSeek-V3 style) for the recurrent block.

    s_i   = sigmoid(u . r_i)                                      (affinity of token u to expert i)
    top-k = argtopk_i (s_i + b_i)                                 (bias b: selection only)
    g_i   = s_i / sum_{j in top-k} s_j                            (gate, without the bias)
    y     = sum_{i in top-k} g_i FFN_i(u) + sum_shared FFN_s(u)

Aux-loss-free balancing: ``b`` is a buffer, not a parameter. The layer counts how many tokens each
expert received (``expert_load``); after every optimizer step ``update_router_bias`` moves each
bias by ``rate * sign(mean_load - load_i)``, so over-loaded experts become less likely to be picked.

Dispatch has no Python loop over experts: the (token, expert) assignments are sorted by expert and
all experts run as one grouped matmul (``F.grouped_mm``); where it is unavailable (old torch, fp32
on GPU) a capacity-padded batched matmul does the same work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import MythosConfig
from .layers import SwiGLU


def _grouped_mm_available() -> bool:
    return hasattr(F, "grouped_mm")


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor,
                   expert_ids: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` sorted by expert times that expert's weight: out[r] = x[r] @ weight[e_r].T.

    x: (N, in) sorted by expert; weight: (E, out, in); offsets: (E,) int32 cumulative row ends;
    expert_ids: (N,) expert of each row (sorted).
    """
    # grouped_mm runs bf16 everywhere, fp32 only in eager mode on CPU (its compile-time meta kernel is bf16-only)
    eager_cpu = x.device.type == "cpu" and not torch.compiler.is_compiling()
    if _grouped_mm_available() and x.dtype == weight.dtype and (x.dtype == torch.bfloat16 or eager_cpu):
        return F.grouped_mm(x, weight.transpose(-2, -1), offs=offsets)
    return _padded_bmm(x, weight, offsets, expert_ids)


def _padded_bmm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor,
                expert_ids: torch.Tensor) -> torch.Tensor:
    """Fallback: scatter rows into a zero-padded (E, capacity, in) batch, one bmm, gather back."""
    counts = torch.diff(offsets, prepend=offsets.new_zeros(1))
    slot = torch.arange(x.shape[0], device=x.device) - (offsets - counts)[expert_ids]
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        capacity = x.shape[0]  # a CUDA graph cannot sync: the static upper bound
    else:
        capacity = int(counts.max())  # one host sync; the grouped_mm path has none
    padded = x.new_zeros(weight.shape[0], capacity, x.shape[1]).index_put((expert_ids, slot), x)
    return torch.bmm(padded, weight.transpose(1, 2))[expert_ids, slot]


class MoE(nn.Module):
    def __init__(self, cfg: MythosConfig):
        super().__init__()
        E, D, H = cfg.n_experts, cfg.dim, cfg.expert_dim
        self.n_experts, self.top_k = E, cfg.n_experts_per_tok
        self.router = nn.Linear(D, E, bias=False)
        # stacked routed experts, (E, out, in) like nn.Linear weights
        self.w1 = nn.Parameter(torch.empty(E, H, D))  # gate projection
        self.w3 = nn.Parameter(torch.empty(E, H, D))  # up projection
        self.w2 = nn.Parameter(torch.empty(E, D, H))  # down projection
        self.shared = SwiGLU(D, cfg.n_shared_experts * H) if cfg.n_shared_experts > 0 else None
        self.register_buffer("router_bias", torch.zeros(E, dtype=torch.float32))
        self.register_buffer("expert_load", torch.zeros(E, dtype=torch.float32), persistent=False)
        self.track_load = True

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k expert ids (N, k) chosen with the bias, and their gates (N, k) without it."""
        scores = torch.sigmoid(F.linear(x, self.router.weight).float())
        expert_ids = torch.topk(scores + self.router_bias, self.top_k, dim=-1).indices
        gates = scores.gather(-1, expert_ids)
        return expert_ids, gates / gates.sum(-1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        expert_ids, gates = self.route(x)
        flat = expert_ids.flatten()
        order = flat.argsort(stable=True)                     # assignments sorted by expert
        counts = torch.zeros(self.n_experts, dtype=torch.long, device=x.device).index_add_(
            0, flat, torch.ones_like(flat))  # tokens per expert; fixed shape (E,) for torch.compile
        if self.training and self.track_load:
            self.expert_load += counts.to(self.expert_load.dtype)
        offsets = counts.cumsum(0).to(torch.int32)
        sorted_ids = flat[order]
        # grouped_mm is not autocast-aware: run the experts in the autocast dtype ourselves
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        w1, w2, w3 = (w.to(dtype) for w in (self.w1, self.w2, self.w3))
        xs = x.index_select(0, order // self.top_k).to(dtype)  # token row of each sorted assignment
        h = F.silu(grouped_linear(xs, w1, offsets, sorted_ids)) * grouped_linear(xs, w3, offsets, sorted_ids)
        ys = grouped_linear(h, w2, offsets, sorted_ids)
        y = torch.empty_like(ys).index_copy_(0, order, ys)    # back to (token, slot) order
        out = (y.view(-1, self.top_k, shape[-1]) * gates.to(y.dtype).unsqueeze(-1)).sum(1)
        if self.shared is not None:
            out = out + self.shared(x)
        return out.view(shape)

    @torch.no_grad()
    def update_router_bias(self, rate: float) -> torch.Tensor:
        """b_i += rate * sign(mean load - load_i); resets the load counter. Returns the load used."""
        load = self.expert_load.clone()
        self.router_bias += rate * torch.sign(load.mean() - load)  # all-zero load: no change
        self.expert_load.zero_()
        return load

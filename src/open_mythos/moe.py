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
on GPU, ``dim`` or ``expert_dim`` rows not a multiple of 16 bytes) a capacity-padded batched matmul
does the same work. Moving rows into and out of expert order is a permutation, so both directions
are gathers in forward *and* backward (no scatter-add).
A few tokens (decoding) skip the sort: each assignment gathers its expert's weights and all of them
run as one batched matmul.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .config import MythosConfig
from .layers import Linear, SwiGLU, compute_dtype, matvec


def _grouped_mm_available() -> bool:
    return hasattr(F, "grouped_mm")


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor,
                   expert_ids: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` sorted by expert times that expert's weight: out[r] = x[r] @ weight[e_r].T.

    x: (N, in) sorted by expert; weight: (E, out, in); offsets: (E,) int32 cumulative row ends;
    expert_ids: (N,) expert of each row (sorted).
    """
    # grouped_mm runs bf16 everywhere, fp32 only in eager mode on CPU (its compile-time meta kernel is bf16-only),
    # and needs rows (in and out features) that are multiples of 16 bytes: dim, expert_dim % 8 in bf16, % 4 in fp32
    eager_cpu = x.device.type == "cpu" and not torch.compiler.is_compiling()
    aligned = all(n * x.element_size() % 16 == 0 for n in weight.shape[1:])
    if _grouped_mm_available() and x.dtype == weight.dtype and (x.dtype == torch.bfloat16 or eager_cpu) and aligned:
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


def _narrow(ids: torch.Tensor, bound: int) -> torch.Tensor:
    """Integer ids in [0, bound) as the narrowest dtype that holds them: a GPU radix sort makes one pass
    per key byte (8 for int64, 1 for uint8)."""
    for dtype in (torch.uint8, torch.int16, torch.int32):
        if bound <= torch.iinfo(dtype).max + 1:
            return ids.to(dtype)
    return ids


def topk_by_rank(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (N, k) of the k largest scores per row, largest first, ties to the lower index.

    rank_i = #{j : s_j > s_i} + #{j < i : s_j = s_i};  id_r = sum_i i [rank_i = r].
    Costs O(E^2) per row, so only for a few rows (decoding): there torch.compile fuses it into one
    small kernel, where torch.topk launches a sort. (For a training batch of thousands of tokens the
    O(E^2) work catches up with the sort, so training keeps torch.topk.)
    """
    idx = torch.arange(scores.shape[-1], device=scores.device)
    s_i, s_j = scores.unsqueeze(-1), scores.unsqueeze(-2)
    beats = (s_j > s_i) | ((s_j == s_i) & (idx < idx.unsqueeze(-1)))  # [.., i, j]: j ranks before i
    rank = beats.sum(-1)
    return ((rank.unsqueeze(-1) == torch.arange(k, device=scores.device)) * idx.unsqueeze(-1)).sum(-2)


class _Dispatch(torch.autograd.Function):
    """xs = x[order // k]: every token's row once per chosen expert, in expert order.

    Backward gathers with the inverse permutation and sums a token's k rows — no atomic scatter-add
    (autograd's index_select backward), which is slow in bf16 on GPU."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, k: int) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x.index_select(0, order // k)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse).view(-1, ctx.k, grad.shape[-1]).sum(1), None, None, None


class _Permute(torch.autograd.Function):
    """rows = x[index] for a permutation ``index`` whose inverse is given: backward is x[inverse]."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


class MoE(nn.Module):
    def __init__(self, cfg: MythosConfig):
        super().__init__()
        E, D, H = cfg.n_experts, cfg.dim, cfg.expert_dim
        self.n_experts, self.top_k = E, cfg.n_experts_per_tok
        self.router = Linear(D, E, bias=False)
        # stacked routed experts, (E, out, in) like nn.Linear weights
        self.w1 = nn.Parameter(torch.empty(E, H, D))  # gate projection
        self.w3 = nn.Parameter(torch.empty(E, H, D))  # up projection
        self.w2 = nn.Parameter(torch.empty(E, D, H))  # down projection
        self.shared = SwiGLU(D, cfg.n_shared_experts * H) if cfg.n_shared_experts > 0 else None
        self.register_buffer("router_bias", torch.zeros(E, dtype=torch.float32))
        self.register_buffer("expert_load", torch.zeros(E, dtype=torch.float32), persistent=False)
        self.track_load = True  # count expert_load in training (off while activation checkpointing recomputes)
        self.gather_max_assignments = 16  # at most this many (token, expert) pairs: gathered-weights path

    def _apply(self, fn, recurse: bool = True):
        """``Module.to(dtype)`` / ``.bfloat16()`` cast floating buffers too; the routing bias and the load counter
        stay fp32 (in bf16 a bias of magnitude ~1 rounds by up to 0.004, and steps of ``router_bias_update_rate``
        (1e-3) vanish: a bf16 inference model would route differently from the model it was trained as)."""
        fp32 = {name: self._buffers[name] for name in ("router_bias", "expert_load")}
        super()._apply(fn, recurse)
        for name, old in fp32.items():  # the values as they were, on the device fn chose (from meta: fn's fresh ones)
            new = self._buffers[name]
            self._buffers[name] = new.float() if old.is_meta else old.to(new.device)
        return self

    def _few(self, n_tokens: int) -> bool:
        """Whether n_tokens tokens (decoding) take the gathered-weights path instead of the sort."""
        return n_tokens * self.top_k <= self.gather_max_assignments

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k expert ids (N, k) chosen with the bias, and their gates (N, k) without it: the chosen experts'
        sigmoid scores normalised to sum 1, g_i = s_i / sum_j s_j, computed as a softmax of log s over the k
        (finite even where every chosen s_j underflows to 0, which the plain quotient turns into 0/0)."""
        logits = self.router(x).float()
        scores = torch.sigmoid(logits)
        biased = scores + self.router_bias
        if torch.compiler.is_compiling() and self._few(x.shape[0]):
            expert_ids = topk_by_rank(biased, self.top_k)  # decoding: one fused kernel instead of a sort
        else:
            # the gates need no order: skip the sort
            expert_ids = torch.topk(biased, self.top_k, dim=-1, sorted=False).indices
        return expert_ids, torch.softmax(F.logsigmoid(logits.gather(-1, expert_ids)), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        expert_ids, gates = self.route(x)
        flat = expert_ids.flatten()
        grouped = not self._few(x.shape[0])
        counts = None
        if grouped or (self.training and self.track_load):
            # tokens per expert, shape (E,) for any routing; a comparison + sum, not an index_add: torch.compile
            # lowers that to a deterministic sort-based scatter which costs ~0.7 ms on GPU for 32k assignments
            counts = (flat.unsqueeze(1) == torch.arange(self.n_experts, device=x.device)).sum(0)
        if self.training and self.track_load:
            self.expert_load += counts.to(self.expert_load.dtype)
        dtype = compute_dtype(x)  # grouped_mm is not autocast-aware: run the experts in the autocast dtype ourselves
        xd = x.to(dtype)
        y = self._grouped(xd, flat, counts, dtype) if grouped else self._gathered(xd, flat, dtype)
        out = (y.view(-1, self.top_k, shape[-1]) * gates.to(y.dtype).unsqueeze(-1)).sum(1)
        if self.shared is not None:
            out = out + self.shared(x)
        return out.view(shape)

    def _grouped(self, x: torch.Tensor, flat: torch.Tensor, counts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Sort the assignments by expert, one grouped GEMM per projection, unsort. Returns (N * k, D)
        in (token, slot) order."""
        order = _narrow(flat, self.n_experts).argsort(stable=True)  # assignments sorted by expert
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        offsets = counts.cumsum(0).to(torch.int32)
        sorted_ids = flat[order]
        w1, w2, w3 = (w.to(dtype) for w in (self.w1, self.w2, self.w3))
        xs = _Dispatch.apply(x, order, inverse, self.top_k)
        h = F.silu(grouped_linear(xs, w1, offsets, sorted_ids)) * grouped_linear(xs, w3, offsets, sorted_ids)
        return _Permute.apply(grouped_linear(h, w2, offsets, sorted_ids), inverse, order)

    def _gathered(self, x: torch.Tensor, flat: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Each assignment through its expert's gathered weights: one row per matrix (``matvec``: batched
        matmuls; compiled, reductions that read the chosen experts' weights in place)."""
        xs = x.repeat_interleave(self.top_k, 0)  # (N * k, D)
        w1, w2, w3 = (w.index_select(0, flat).to(dtype) for w in (self.w1, self.w2, self.w3))
        return matvec(F.silu(matvec(xs, w1)) * matvec(xs, w3), w2)

    @contextlib.contextmanager
    def load_tracking(self, enabled: bool):
        """Within the context, count the expert load (training) only if ``enabled``."""
        saved, self.track_load = self.track_load, enabled
        try:
            yield
        finally:
            self.track_load = saved

    @torch.no_grad()
    def update_router_bias(self, rate: float) -> torch.Tensor:
        """b_i += rate * sign(mean load - load_i); resets the load counter. Returns the load used."""
        load = self.expert_load.clone()
        self.router_bias += rate * torch.sign(load.mean() - load)  # all-zero load: no change
        self.expert_load.zero_()
        return load

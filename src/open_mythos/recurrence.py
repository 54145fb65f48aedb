"""The looped core: LTI-stable input injection, ACT halting, depth-wise LoRA, loop-index embedding,
and the recurrent block that runs one shared transformer block ``n_loops`` times.

Recurrent update, for loop t = 0 .. n_loops-1, with e the Prelude output and h_0 from
``cfg.state_init`` (0, e, or N(0, init_std^2) noise):

    x_t     = h_t + e + loop_embeddings[min(t, L-1)]         L = max_loop_iters
    h_{t+1} = A h_t + B e + Transformer(x_t) + LoRA_min(t, L-1)(x_t)      (cfg.injection = "lti")
    h_{t+1} =     h_t     + Transformer(x_t) + LoRA_min(t, L-1)(x_t)      (cfg.injection = "residual")
    h_{t+1} = A h_t + Δ ⊙ (B e) + Transformer(x_t) + LoRA(x_t)   (cfg.injection = "parcae"; B full, Δ per channel)
    h_{t+1} <- RMSNorm(h_{t+1})                                            (cfg.state_norm = True)

The loop embedding is a fixed sinusoid (cfg.loop_embed = "sinusoid") or a trained table that starts as
that sinusoid (cfg.loop_embed = "learned"); both are scaled by cfg.loop_embed_scale at init.

From loop L-1 on, the map h_t -> h_{t+1} no longer depends on t: running more loops than
``max_loop_iters`` iterates one fixed map, which can settle at a fixed point instead of drifting.

A and B come from a continuous-time diagonal system dh/dτ = -exp(log_A) h + B e discretised with a
learned step Δt = exp(log_dt):  A = exp(-Δt exp(log_A)) (zero-order hold),  B_disc = Δt B.
Every entry of A lies in [0, 1) for every parameter value, so ρ(A) < 1 by construction.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .blocks import TransformerBlock
from .cache import KVCache
from .config import MythosConfig
from .layers import Linear, RMSNorm, sinusoid
from .moe import MoE


class ZOHDecay(nn.Module):
    """The diagonal decay the contracting injections share: the system dh/dτ = -exp(log_A) h discretised by a
    zero-order hold with step Δ gives A = exp(-Δ exp(log_A)), every entry in [0, 1). Subclasses give log Δ."""

    def __init__(self, dim: int):
        super().__init__()
        # decay rates exp(log_A) spread over [0.5, 2] (A in [0.14, 0.61]): channels start with different,
        # short memories, so the state settles within a few loops instead of growing for ~10
        self.log_A = nn.Parameter(torch.linspace(math.log(0.5), math.log(2.0), dim))

    def log_step(self) -> torch.Tensor:
        """log Δ, fp32, of shape (1,) or (dim,)."""
        raise NotImplementedError

    def get_A(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Diagonal of the discrete transition matrix A, shape (dim,); ρ(A) = max_i |A_ii|.

        Computed in fp32 as  A = c * exp(-exp(log Δ + log_A)) with c = 1 - eps(dtype)/2, the largest
        value below 1 that ``dtype`` can represent, so that rounding to ``dtype`` can never reach 1; the rate is
        summed in log space, so no parameter values give 0 * inf.
        """
        dtype = dtype or self.log_A.dtype
        cap = 1.0 - torch.finfo(dtype).eps / 2
        rate = torch.exp(self.log_step() + self.log_A.float())
        return (cap * torch.exp(-rate)).to(dtype)

    def spectral_radius(self, dtype: torch.dtype | None = None) -> float:
        return self.get_A(dtype).abs().max().item()


class LTIInjection(ZOHDecay):
    """h_{t+1} = A h_t + B_disc e + transformer_out, with ρ(A) < 1 for any log_A, log_dt: one learned step
    Δt = exp(log_dt) for every channel, B_disc = Δt B with B diagonal."""

    def __init__(self, dim: int):
        super().__init__(dim)
        self.log_dt = nn.Parameter(torch.zeros(1))  # shape (1,), not a scalar: FSDP2 shards 1-D+
        self.B = nn.Parameter(torch.ones(dim))

    def log_step(self) -> torch.Tensor:
        return self.log_dt.float()

    def forward(self, h: torch.Tensor, e: torch.Tensor, transformer_out: torch.Tensor) -> torch.Tensor:
        A = self.get_A(h.dtype)
        B = (torch.exp(self.log_dt.float()) * self.B.float()).to(h.dtype)
        return A * h + B * e + transformer_out


class ParcaeInjection(ZOHDecay):
    """Parcae's constrained injection: h_{t+1} = A h_t + Δ ⊙ (B e) + transformer_out, with a per-channel step
    Δ = softplus(δ) (D,), A = exp(-Δ ⊙ exp(log_A)) (diagonal, every entry in [0, 1)) and a full B (D, D)
    started at the identity. Against ``LTIInjection``: one step per channel instead of one shared Δt, through
    softplus instead of exp, and B mixes the channels of e. At init Δ = 1, so A and B match LTIInjection's."""

    def __init__(self, dim: int):
        super().__init__(dim)
        self.dt_raw = nn.Parameter(torch.full((dim,), math.log(math.e - 1)))  # softplus(dt_raw) = 1
        self.B = nn.Parameter(torch.eye(dim))

    def step(self) -> torch.Tensor:
        """Δ = softplus(dt_raw), (dim,) fp32."""
        return nn.functional.softplus(self.dt_raw.float())

    def log_step(self) -> torch.Tensor:
        """log Δ, (dim,) fp32, finite with finite gradients for any dt_raw (log softplus(x) = x below -20,
        where softplus(x) = exp(x) to fp32 precision and would underflow to 0 further down)."""
        x = self.dt_raw.float()
        return torch.where(x < -20, x, torch.log(nn.functional.softplus(x.clamp(min=-20))))

    def forward(self, h: torch.Tensor, e: torch.Tensor, transformer_out: torch.Tensor) -> torch.Tensor:
        injected = nn.functional.linear(e, self.B.to(e.dtype)) * self.step().to(e.dtype)
        return self.get_A(h.dtype) * h + injected + transformer_out


INJECTION_CLASSES = {"lti": LTIInjection, "parcae": ParcaeInjection}


class ResidualInjection(nn.Module):
    """h_{t+1} = h_t + transformer_out: the state is a residual stream (A = I, B = 0); e enters each loop
    through the block input x_t = h_t + e only. What a loop writes persists until a later loop changes it."""

    def spectral_radius(self, dtype: torch.dtype | None = None) -> float:
        return 1.0

    def forward(self, h: torch.Tensor, e: torch.Tensor, transformer_out: torch.Tensor) -> torch.Tensor:
        return h + transformer_out


def act_halted(p_sum: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
    """The ACT halting rule (Graves 2016), the one copy the model, the engine's ``act`` exit and the exit
    training apply: a position has halted once the sum of its halting probabilities so far reaches the
    threshold, sum_{j<=d} p_j >= threshold. ``p_sum``: that sum per position; ``threshold``: a float, or a
    tensor broadcasting against ``p_sum`` (the engine's per-row thresholds, inf: never). Bool, ``p_sum``'s
    shape."""
    return p_sum >= threshold


def act_depth(probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """The ACT halting depth (...) from halting probabilities p_1..p_D (D, ...): the first depth d in 1..D at
    which :func:`act_halted` holds, or D (the budget) where none does. Long."""
    halted = act_halted(probs.cumsum(0), threshold)
    halted[-1] = True
    return halted.float().argmax(0) + 1


class ACTHalting(nn.Module):
    """Adaptive Computation Time (Graves 2016): p_t = sigmoid(w . h_t + b) per position.

    A position halts at the first loop where its cumulative p reaches ``threshold`` (:func:`act_halted`); its
    weight there is the *remainder* 1 - sum of earlier p, so the weights over loops sum to exactly 1.
    """

    def __init__(self, dim: int, threshold: float):
        super().__init__()
        self.threshold = threshold
        self.proj = Linear(dim, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.constant_(self.proj.bias, -1.0)  # p ≈ 0.27 at init: a few loops before halting

    def is_constant(self) -> bool:
        """True when w = 0: p_t = sigmoid(b) for every state, so the ``act`` exit rule stops every token at the
        same depth. The unit starts so and, under ``loop_output="final"``, keeps it unless its exit is trained
        (``[exit]``, training/exit.py)."""
        return not bool(self.proj.weight.detach().any())

    def halting_logit(self, h: torch.Tensor) -> torch.Tensor:
        """w . h_t + b per position, fp32 (h.shape[:-1]): p_t's logit (for losses that need it unsaturated)."""
        return self.proj(h).squeeze(-1).float()

    def halting_prob(self, h: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.halting_logit(h))

    def weight(self, p: torch.Tensor | None, cum: torch.Tensor, last: bool | torch.Tensor) -> torch.Tensor:
        """ACT weight w_t of this loop's state for every position (the one copy of the rule).

            running = cum < threshold
            w_t     = 1 - cum   where running and (cum + p >= threshold or this is the last loop)
                    = p         where running otherwise,    0 where halted earlier

        p: halting probabilities of this loop (shape of ``cum``); may be None when ``last`` is True.
        last: True / False for every position, or a bool tensor (shape of ``cum``) marking the
        positions whose final loop this is (the inference engine's per-token budgets).
        The caller adds w_t to ``cum``: the weights over loops sum to exactly 1."""
        running = ~act_halted(cum, self.threshold)
        if last is True:
            return torch.where(running, 1.0 - cum, torch.zeros_like(cum))
        halts = running & act_halted(cum + p, self.threshold)
        if last is not False:
            halts = halts | (running & last)
        return torch.where(halts, 1.0 - cum, torch.where(running, p, torch.zeros_like(p)))


class DepthLoRA(nn.Module):
    """Per-loop low-rank adapter (Relaxed Recursive Transformers): Δ_t(x) = U_t D_t norm(x).

    One (D_t, U_t) pair per loop index up to ``max_loop_iters``; loops beyond it reuse the last
    adapter (index clamped), so running more loops than trained is always defined. U_t starts at
    zero: at initialisation every loop applies the same shared block.
    """

    def __init__(self, dim: int, rank: int, n_loops: int, eps: float, std: float):
        super().__init__()
        self.norm = RMSNorm(dim, eps)
        self.down = nn.Parameter(torch.randn(n_loops, rank, dim) * std)
        self.up = nn.Parameter(torch.zeros(n_loops, dim, rank))

    def adapter(self, loop_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(D_t, U_t) for loop ``loop_index`` (views; index clamped to the last trained adapter)."""
        i = min(loop_index, self.down.shape[0] - 1)
        return self.down[i], self.up[i]

    def delta(self, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """Δ(x) = U D norm(x) for given adapter matrices (not `apply`: that is nn.Module.apply).

        down/up: (rank, dim)/(dim, rank), or batched per row (B, rank, dim)/(B, dim, rank)."""
        return (self.norm(x) @ down.mT) @ up.mT

    def forward(self, x: torch.Tensor, loop_index: int) -> torch.Tensor:
        return self.delta(x, *self.adapter(loop_index))


def loop_embeddings(n_loops: int, dim: int, scale: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """scale * sinusoidal embeddings of loop indices 0..n_loops-1, (n_loops, dim), on the first dim/8 channels."""
    width = max(2, dim // 8)
    emb = scale * sinusoid(torch.arange(n_loops, device=device), width)
    return torch.nn.functional.pad(emb, (0, dim - width)).to(dtype)


class RecurrentBlock(nn.Module):
    """One shared transformer block (MoE FFN by default) looped ``n_loops`` times with input injection
    (``cfg.injection``) and ACT halting.

    Stages (``OpenMythos`` exposes them to its drivers, the training loop and the inference engine):
    :meth:`initial_state` (h_0), :meth:`loop_inputs` (loop index -> its embedding row and LoRA matrices),
    :meth:`iteration` (one loop, pure in tensors: compiled once for every index), :meth:`iterate` (both),
    :meth:`halt` (ACT bookkeeping) and :meth:`readout` (what the Coda receives)."""

    def __init__(self, cfg: MythosConfig):
        super().__init__()
        self.cfg = cfg
        self.block = TransformerBlock(cfg, use_moe=cfg.recurrent_ffn == "moe", sandwich_norm=cfg.sandwich_norm)
        self.injection = INJECTION_CLASSES[cfg.injection](cfg.dim) if cfg.injection in INJECTION_CLASSES \
            else ResidualInjection()
        # cfg.loop_embed = "learned": the loop-index table is a parameter, started as the sinusoid (computed in
        # fp32, held in the default dtype like every other parameter)
        self.loop_embed = nn.Parameter(loop_embeddings(cfg.max_loop_iters, cfg.dim, cfg.loop_embed_scale,
                                                       torch.get_default_device(), torch.get_default_dtype())) \
            if cfg.loop_embed == "learned" else None
        self.act = ACTHalting(cfg.dim, cfg.act_threshold)
        self.lora = DepthLoRA(cfg.dim, cfg.lora_rank, cfg.max_loop_iters, cfg.norm_eps, cfg.init_std) \
            if cfg.lora_rank > 0 else None
        # Coda sees the state's direction, not its scale (cfg.loop_out_norm)
        self.out_norm = RMSNorm(cfg.dim, cfg.norm_eps) if cfg.loop_out_norm else nn.Identity()
        # the next loop sees a state of fixed scale (cfg.state_norm)
        self.state_norm = RMSNorm(cfg.dim, cfg.norm_eps) if cfg.state_norm else nn.Identity()
        self._loop_tables: dict[tuple, torch.Tensor] = {}  # memo of loop_table by (device, dtype)

    def initial_state(self, e: torch.Tensor) -> torch.Tensor:
        """h_0 for Prelude output e (..., dim): zeros, e itself, or N(0, init_std^2) noise (``cfg.state_init``)."""
        if self.cfg.state_init == "embed":
            return e
        if self.cfg.state_init == "random":
            return torch.randn_like(e) * self.cfg.init_std
        return torch.zeros_like(e)

    def loop_table(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Loop-index embeddings of the trained loop indices 0..max_loop_iters-1, (max_loop_iters, dim).

        Computed once per (device, dtype) and kept (not a buffer: it is derived, never saved); inside
        torch.compile or a CUDA-graph capture a missing table is computed without being kept. With
        ``loop_embed = "learned"`` it is the trained parameter (cast to ``dtype``)."""
        cfg = self.cfg
        if self.loop_embed is not None:
            return self.loop_embed.to(dtype)
        if torch.compiler.is_compiling():
            return loop_embeddings(cfg.max_loop_iters, cfg.dim, cfg.loop_embed_scale, device, dtype)
        key = (torch.device(device), dtype)
        table = self._loop_tables.get(key)
        if table is None:
            with torch.inference_mode(False), torch.no_grad():  # a plain tensor, usable under autograd later
                table = loop_embeddings(cfg.max_loop_iters, cfg.dim, cfg.loop_embed_scale, device, dtype)
            if not (table.is_cuda and torch.cuda.is_current_stream_capturing()):
                self._loop_tables[key] = table
        return table

    def loop_inputs(self, t: int | torch.Tensor, like: torch.Tensor
                    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """(loop embedding, LoRA (D_t, U_t) or None) of loop index ``t``, clamped to max_loop_iters - 1.

        t: an int (every position at the same loop), or a LongTensor (B,) of one index per row for
        states (B, T, dim): then the embedding is (B, 1, dim) and the LoRA matrices (B, rank, dim) /
        (B, dim, rank). ``like``: a tensor with the device and dtype of the state."""
        last = self.cfg.max_loop_iters - 1
        table = self.loop_table(like.device, like.dtype)
        if isinstance(t, torch.Tensor):
            i = t.clamp(max=last)
            emb = table[i][:, None]
            lora = (self.lora.down[i], self.lora.up[i]) if self.lora is not None else None
            return emb, lora
        return table[min(t, last)], self.lora.adapter(t) if self.lora is not None else None

    def iteration(self, h: torch.Tensor, e: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                  loop_emb: torch.Tensor, lora: tuple[torch.Tensor, torch.Tensor] | None,
                  cache: KVCache | None = None, cache_key: tuple | None = None) -> torch.Tensor:
        """One loop iteration: x = h_t + e + loop_emb;  h_{t+1} = A h_t + B e + Transformer(x) + LoRA_t(x)
        (``injection="residual"``: h_{t+1} = h_t + Transformer(x) + LoRA_t(x)), then RMSNorm if ``state_norm``.

        The loop index enters only through tensors (its embedding row and LoRA matrices, from
        :meth:`loop_inputs`), so one compiled graph serves every iteration."""
        x = h + e + loop_emb
        out = self.block.residual(x, rope, cache, cache_key)
        if lora is not None:
            out = out + self.lora.delta(x, *lora)
        return self.state_norm(self.injection(h, e, out))

    def iterate(self, h: torch.Tensor, e: torch.Tensor, t: int | torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor], cache=None, cache_key: tuple | None = None) -> torch.Tensor:
        """h_{t+1} from h_t at loop index ``t`` (int, or (B,) per row: see :meth:`loop_inputs`)."""
        return self.iteration(h, e, rope, *self.loop_inputs(t, h), cache, cache_key)

    def halt(self, h: torch.Tensor, cum: torch.Tensor, depth: torch.Tensor, mixture: torch.Tensor | None,
             is_last: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """ACT bookkeeping after an iteration: depth += [cum < threshold]; w_t from the halting unit,
        cum += w_t; mixture += w_t h_t (``loop_output="act"``). Returns (cum, depth, mixture).

        With ``loop_output="final"`` the weights only measure depth: no gradient flows through them."""
        depth = depth + (~act_halted(cum, self.act.threshold)).float()
        p = None if is_last else self.act.halting_prob(h if mixture is not None else h.detach())
        weight = self.act.weight(p, cum, is_last)
        if mixture is not None:
            mixture = mixture + weight.unsqueeze(-1) * h.float()
        return cum + weight, depth, mixture

    def readout(self, state: torch.Tensor) -> torch.Tensor:
        """What the Coda receives: out_norm of the loop's output state (h_T or the ACT mixture)."""
        return self.out_norm(state)

    def _recompute_context(self):
        """Activation checkpointing's (forward, recomputation) contexts: the recomputation in backward
        re-runs the MoE, which must not count its expert load a second time."""
        ffn = self.block.ffn
        no_count = ffn.load_tracking(False) if isinstance(ffn, MoE) else contextlib.nullcontext()
        return contextlib.nullcontext(), no_count

    def matrices_in(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The shared block's weight matrices cast to ``dtype``, by name (for ``torch.func.functional_call``);
        matrices already in ``dtype`` are left out."""
        return {name: p.to(dtype) for name, p in self.named_parameters()
                if name.startswith("block.") and p.ndim >= 2 and p.dtype != dtype}

    def forward(self, e: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], n_loops: int,
                cache: KVCache | None = None, backprop_loops: int | None = None, *,
                iteration: Callable | None = None, halt: Callable | None = None,
                checkpoint_iterations: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the loop. Returns (readout of the output state, ACT halting depth per position (B, T), fp32).

        The output state is h_T (``loop_output="final"``) or sum_t w_t h_t (``"act"``).
        ``backprop_loops=k`` runs the first n_loops-k iterations without autograd (truncated BPTT).
        Drivers may pass equivalents of :meth:`iteration` / :meth:`halt` (e.g. compiled ones, used only
        without a cache) and ``checkpoint_iterations`` (recompute each loop in backward); see
        ``training/speed.py``.
        """
        h = self.initial_state(e)
        cum = torch.zeros(e.shape[:-1], device=e.device, dtype=torch.float32)
        depth = torch.zeros_like(cum)
        mixture = torch.zeros_like(e, dtype=torch.float32) if self.cfg.loop_output == "act" else None
        first_grad_loop = 0 if backprop_loops is None else max(0, n_loops - backprop_loops)
        if cache is not None:  # compiled variants are traced without a cache
            iteration, halt, checkpoint_iterations = None, None, False
        iteration, halt = iteration or self.iteration, halt or self.halt
        for t in range(n_loops):
            emb, lora = self.loop_inputs(t, e)
            with torch.set_grad_enabled(torch.is_grad_enabled() and t >= first_grad_loop):
                if checkpoint_iterations and torch.is_grad_enabled():
                    h = checkpoint(iteration, h, e, rope, emb, lora, use_reentrant=False,
                                   context_fn=self._recompute_context)
                else:
                    h = iteration(h, e, rope, emb, lora, cache, cache.loop_key(t) if cache is not None else None)
            cum, depth, mixture = halt(h, cum, depth, mixture, is_last=t == n_loops - 1)
        return self.readout(h if mixture is None else mixture.to(e.dtype)), depth

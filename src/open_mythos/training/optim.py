"""Optimizers: Muon for weight matrices, AdamW for everything else, warmup + cosine schedule.

Parameter groups (``param_groups``), explicit and tested:

* ``muon``        2-D weight matrices inside blocks (attention, dense FFN, shared experts) -> torch.optim.Muon
                  (or BatchedMuon with ``optim.muon_impl = "batched"``, and on CPU: fp32 Newton-Schulz)
* ``muon_experts`` stacked routed-expert weights (E, out, in) -> :class:`BatchedMuon` (one Newton-Schulz
  orthogonalisation per expert, batched)
* ``adamw``       depth-wise LoRA (3-D stacks) and an untied LM head, with weight decay
* ``adamw_no_decay`` embeddings (and the learned loop table), norms (and the sandwich norms), biases, router,
  the injection (LTI: log_A, log_dt, B; Parcae: log_A, dt_raw and its full B, which weight decay would pull
  from the identity it starts at towards 0), ACT unit
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from ..config import check_field_types
from .distributed import all_gather_rows

NO_DECAY_MARKERS = ("embed", "norm", "bias", "router", "injection", "act.proj")
NS_COEFFICIENTS = (3.4445, -4.775, 2.0315)  # Newton-Schulz's quintic (a, b, c), Keller Jordan's / torch's


def param_groups(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {
        "muon": [], "muon_experts": [], "adamw": [], "adamw_no_decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if any(m in name for m in NO_DECAY_MARKERS) or p.ndim < 2:
            groups["adamw_no_decay"].append((name, p))
        elif ".lora." in name or name.startswith("head."):
            groups["adamw"].append((name, p))
        elif p.ndim == 3:
            groups["muon_experts"].append((name, p))
        else:
            groups["muon"].append((name, p))
    return groups


def newton_schulz_dtype(device: torch.device) -> torch.dtype:
    """The dtype Newton-Schulz iterates in: bf16 on accelerators (Keller Jordan's Muon, torch.optim.Muon), fp32
    on CPU, where bf16 matmul is emulated unless the CPU has native bf16 (AVX512-BF16/AMX): a 512x512 bf16 matmul
    took ~50x as long as fp32 on an AVX2 EPYC."""
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7,
                  coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """Approximate orthogonalisation U V^T of each matrix in g (..., m, n) by a quintic iteration
    X <- a X + (b A + c A^2) X, A = X X^T (Keller Jordan's Muon; same as torch.optim.Muon), in ``dtype``
    (default :func:`newton_schulz_dtype` of g's device: bf16 on GPU, fp32 on CPU). Returns ``dtype``.

    Each iteration is three matmuls: A = X X^T; M = a I + b A + c A^2, its sum a ``baddbmm`` epilogue
    on the small Gram matrix (beta * input + alpha * product inside the matmul); X <- M X, a plain
    matmul, so no pass over X besides the matmuls (an epilogue ``a X + B X`` copies X first). M is
    rounded to ``dtype``, as the textbook bf16 iteration rounds b A + c A^2."""
    if isinstance(g, DTensor):  # FSDP shards the rows: orthogonalise whole matrices, keep this rank's shard
        full = newton_schulz(g.full_tensor(), steps, eps, coefficients, dtype)
        return distribute_tensor(full, g.device_mesh, g.placements, src_data_rank=None)
    a, b, c = coefficients
    x = g.to(dtype or newton_schulz_dtype(g.device))
    transposed = g.shape[-2] > g.shape[-1]
    if transposed:
        x = x.mT
    shape = x.shape
    x = x.reshape(-1, *shape[-2:])  # baddbmm: one batch dim
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        A = x @ x.mT
        M = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A^2
        M.diagonal(dim1=-2, dim2=-1).add_(a)          # + a I
        x = M @ x
    x = x.reshape(shape)
    return x.mT if transposed else x


def muon_direction(grads: list[torch.Tensor], bufs: list[torch.Tensor], momentum: float, nesterov: bool,
                   ns_steps: int, eps: float, found_inf: torch.Tensor | None = None,
                   ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                   rows: tuple[int, int] | None = None) -> torch.Tensor:
    """For same-shape matrices: m <- mu m + (1 - mu) g in place, then NS(g + mu (m - g)) (Nesterov) or NS(m),
    stacked (n, ..., out, in) in :func:`newton_schulz_dtype`. ``found_inf`` > 0 (a device scalar): the momentum
    is left as it is. ``rows = (i, j)``: every momentum is updated, but only matrices i..j-1 of the stack seen as
    (-1, out, in) are orthogonalised (a rank's share under sharded Muon); returns (j - i, out, in)."""
    for m, g in zip(bufs, grads):
        new = m.lerp(g, 1 - momentum)
        m.copy_(new if found_inf is None else torch.where(found_inf > 0, m, new))
    stack = torch.stack([g.lerp(m, momentum) if nesterov else m for g, m in zip(grads, bufs)])
    if rows is not None:
        stack = stack.flatten(0, -3)[rows[0]:rows[1]]
    return newton_schulz(stack, ns_steps, eps, ns_coefficients)


def muon_apply(params: list[torch.Tensor], directions: torch.Tensor, lr: torch.Tensor, weight_decay: float,
               scale: float, found_inf: torch.Tensor | None = None) -> None:
    """p <- p (1 - lr wd) - lr scale u for each parameter and its direction u (``lr``: a 0-dim tensor);
    ``found_inf`` > 0: p is left as it is."""
    for p, u in zip(params, directions.unbind(0)):
        new = p * (1 - lr * weight_decay) - u.to(p.dtype) * (lr * scale)
        p.copy_(new if found_inf is None else torch.where(found_inf > 0, p, new))


def muon_lr_scale(shape: torch.Size, adjust_lr_fn: str | None) -> float:
    """torch.optim.Muon's learning-rate factor for (..., out, in) matrices: sqrt(max(1, out/in)) (None,
    "original"), 0.2 sqrt(max(out, in)) ("match_rms_adamw": the update's RMS matches AdamW's)."""
    out, inp = shape[-2], shape[-1]
    return 0.2 * math.sqrt(max(out, inp)) if adjust_lr_fn == "match_rms_adamw" else math.sqrt(max(1.0, out / inp))


def newton_schulz_flops(shape: tuple[int, ...], steps: int = 5) -> int:
    """FLOPs of :func:`newton_schulz` on one (out, in) matrix, the trailing dims of ``shape``. With m = min(out, in)
    and k = max(out, in) (X is m x k after the transpose), each iteration is A = X X^T (2 m^2 k), A A inside the
    baddbmm (2 m^3) and M X (2 m^2 k)."""
    m, k = sorted(shape[-2:])
    return steps * (4 * m * m * k + 2 * m ** 3)


def muon_shares(groups: list[tuple[int, int]], world: int) -> list[list[int]]:
    """How many matrices of each same-shape group every rank orthogonalises under sharded Muon.

    ``groups``: (matrices in the group, FLOPs per matrix). Every rank takes floor(n / W) matrices of each group;
    the n mod W left over go, groups of the costliest matrices first, one each to the ranks with the fewest FLOPs
    so far (the lower rank on a tie). Deterministic (every rank computes the same plan), and the ranks' FLOPs end
    within one matrix of the costliest shape of each other. Returns ``shares[g][r]``; rank r orthogonalises
    the contiguous run of group g's matrices that follows ranks 0..r-1's."""
    load = [0] * world
    shares: list[list[int]] = [[] for _ in groups]
    for g in sorted(range(len(groups)), key=lambda g: -groups[g][1]):
        n, flops = groups[g]
        share = [n // world] * world
        for r in sorted(range(world), key=lambda r: (load[r], r))[:n % world]:
            share[r] += 1
        load = [x + c * flops for x, c in zip(load, share)]
        shares[g] = share
    return shares


class BatchedMuon(torch.optim.Optimizer):
    """Muon for parameters of any rank >= 2, leading dims batched (e.g. stacked experts).

    Same update as torch.optim.Muon applied to every trailing (out, in) matrix:
    m <- mu m + (1-mu) g;  u = NS(g + mu (m - g)) (Nesterov);  p <- p (1 - lr wd) - lr s u, with
    s = sqrt(max(1, out/in)) (``adjust_lr_fn`` None or "original") or 0.2 sqrt(max(out, in)) ("match_rms_adamw").
    Same-shape parameters share one batched Newton-Schulz. The hyper-parameters are torch.optim.Muon's, so
    optimizer state moves between the two (a run checkpointed on CPU, which uses this class, resumes on GPU).

    Like torch's fused Adam/AdamW, a ``found_inf`` attribute (a device scalar, set by the caller) makes
    the step skip itself on the device when it is > 0: no host sync is needed to skip a non-finite step.

    ``shard = True`` (data parallelism, torch.distributed initialised; every rank holds the same parameters and the
    same all-reduced gradients, as under DDP): each rank orthogonalises only its share of every same-shape stack
    (:func:`muon_shares`: balanced by FLOPs) and the bf16 directions are all-gathered, one asynchronous collective
    per stack launched as soon as its Newton-Schulz is done and waited on one stack later, so it overlaps the next
    stack's orthogonalisation; every rank then applies every update, so the weights stay identical. The momentum
    stays whole on every rank (its update is elementwise: memory traffic, not FLOPs): the state, and so a
    checkpoint, is the same as unsharded at any world size. Per rank, Newton-Schulz FLOPs drop from
    sum over matrices of 5 (4 m^2 k + 2 m^3) to about 1/W of it (shakespeare-100m: 1.57 TFLOP per step -> 0.79 and
    0.78 at W = 2); the all-gather moves 2 bytes per Muon parameter x (W - 1)/W in and out of each rank (105M
    parameters at W = 2: 105 MB each way), beside the gradient all-reduce's 2 x 4 bytes x (W - 1)/W.
    """

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5, eps: float = 1e-7, compile: bool = False,
                 ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS, adjust_lr_fn: str | None = None,
                 shard: bool = False):
        if adjust_lr_fn not in (None, "original", "match_rms_adamw"):
            raise ValueError(f"adjust_lr_fn must be None, 'original' or 'match_rms_adamw', got {adjust_lr_fn!r}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                                      ns_steps=ns_steps, eps=eps, ns_coefficients=tuple(ns_coefficients),
                                      adjust_lr_fn=adjust_lr_fn))
        if shard and any(isinstance(p, DTensor) for g in self.param_groups for p in g["params"]):
            raise ValueError("BatchedMuon(shard=True) is for replicated parameters (DDP); FSDP's DTensor "
                             "parameters are orthogonalised whole on every rank")
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if shard else (0, 1)
        # compiled: the momentum update, the stacking and the 5 iterations become a few fused kernels, and the
        # parameter update one kernel per matrix (the learning rate is a tensor input: no recompiles)
        self._direction = torch.compile(muon_direction, dynamic=False) if compile else muon_direction
        self._apply = torch.compile(muon_apply, dynamic=False) if compile else muon_apply

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        found_inf = getattr(self, "found_inf", None)  # set by the caller for this step (step_graph)
        stacks = []  # (param group, learning rate, shape, same-shape parameters)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            lr = group["lr"]  # a float, or a 0-dim device tensor (captured step)
            if not isinstance(lr, torch.Tensor):
                lr = torch.full((), lr, device=params[0].device)
            by_shape: dict[torch.Size, list[torch.Tensor]] = defaultdict(list)
            for p in params:
                by_shape[p.shape].append(p)
            stacks += [(group, lr, shape, same) for shape, same in by_shape.items()]
        shares = muon_shares([(len(same) * math.prod(shape[:-2]), newton_schulz_flops(shape, group["ns_steps"]))
                              for group, _, shape, same in stacks], self.world)
        previous = None  # the stack whose directions are on their way (sharded: being all-gathered)
        for stack, share in zip(stacks, shares):
            group, lr, shape, same = stack
            bufs = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(p)) for p in same]
            first = sum(share[:self.rank])
            directions = self._direction([p.grad for p in same], bufs, group["momentum"], group["nesterov"],
                                         group["ns_steps"], group["eps"], found_inf,
                                         tuple(group.get("ns_coefficients", NS_COEFFICIENTS)),
                                         *([(first, first + share[self.rank])] if self.world > 1 else []))
            if previous is not None:
                self._update(*previous, found_inf)
            previous = stack, (all_gather_rows(directions, share) if self.world > 1 else lambda d=directions: d)
        if previous is not None:
            self._update(*previous, found_inf)
        return loss

    def _update(self, stack: tuple, directions, found_inf: torch.Tensor | None) -> None:
        """p <- p (1 - lr wd) - lr scale u for one same-shape stack, once its directions (a function returning
        them) have arrived."""
        group, lr, shape, same = stack
        self._apply(same, directions().view(len(same), *shape), lr, group["weight_decay"],
                    muon_lr_scale(shape, group.get("adjust_lr_fn")), found_inf)


@dataclass
class OptimConfig:
    muon_lr: float = 0.02
    adamw_lr: float = 3e-3
    weight_decay: float = 0.1
    muon_momentum: float = 0.95
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    # "torch": torch.optim.Muon for 2-D matrices (one Newton-Schulz per tensor) where torch has it, on GPU;
    # "batched": BatchedMuon for all of them (same-shape matrices orthogonalised in one batched call)
    muon_impl: str = "torch"
    # under torchrun with parallel='ddp': each rank orthogonalises its share of BatchedMuon's matrices and the
    # directions are all-gathered (BatchedMuon's docstring); off: every rank orthogonalises every matrix
    shard_muon: bool = True

    def __post_init__(self) -> None:
        check_field_types(self, "optim.")
        for name in ("muon_lr", "adamw_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"optim.{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.weight_decay < 1:
            raise ValueError(f"optim.weight_decay must be in [0, 1), got {self.weight_decay}")
        if not 0 <= self.muon_momentum < 1:
            raise ValueError(f"optim.muon_momentum must be in [0, 1), got {self.muon_momentum}")
        self.betas = tuple(self.betas)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.muon_impl not in ("torch", "batched"):
            raise ValueError(f"optim.muon_impl must be 'torch' or 'batched', got {self.muon_impl!r}")
        if not self.grad_clip >= 0:
            raise ValueError(f"optim.grad_clip must be >= 0 (0 = off), got {self.grad_clip}")


def build_optimizers(model: nn.Module, cfg: OptimConfig, compile: bool = False,
                     capturable: bool = False, shard: bool = False) -> list[torch.optim.Optimizer]:
    """[Muon (2-D), BatchedMuon (expert stacks), AdamW] — empty groups are left out; torch.optim.Muon
    (``optim.muon_impl = "torch"``) only where it has our Newton-Schulz dtype (bf16, not on CPU: it has no
    dtype option), BatchedMuon takes the 2-D matrices elsewhere. ``compile``:
    BatchedMuon's direction (momentum + Newton-Schulz) and update run through torch.compile.
    ``capturable``: AdamW keeps its step count on the device, so its step can be captured in a CUDA graph.
    ``shard``: BatchedMuon orthogonalises this rank's share of its matrices (data parallelism with replicated
    parameters; torch.optim.Muon, with ``muon_impl = "torch"``, still orthogonalises all of its own).
    AdamW is fused (one kernel for all tensors, on GPU and CPU; its ``found_inf`` skip, which step_graph
    uses, needs it) unless its parameters are DTensors (FSDP)."""
    groups = param_groups(model)
    params = {k: [p for _, p in v] for k, v in groups.items()}
    opts: list[torch.optim.Optimizer] = []
    hyper = dict(lr=cfg.muon_lr, weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum)
    torch_muon = getattr(torch.optim, "Muon", None) if cfg.muon_impl == "torch" else None
    if torch_muon is not None and params["muon"] and newton_schulz_dtype(params["muon"][0].device) == torch.bfloat16:
        opts.append(torch_muon(params["muon"], **hyper))
        batched = params["muon_experts"]
    else:
        batched = params["muon"] + params["muon_experts"]
    if batched:
        opts.append(BatchedMuon(batched, **hyper, compile=compile, shard=shard))
    adamw_groups = [{"params": params["adamw"], "weight_decay": cfg.weight_decay},
                    {"params": params["adamw_no_decay"], "weight_decay": 0.0}]
    adamw_params = params["adamw"] + params["adamw_no_decay"]
    fused = bool(adamw_params) and all(type(p.data) is torch.Tensor for p in adamw_params)
    opts.append(torch.optim.AdamW([g for g in adamw_groups if g["params"]], lr=cfg.adamw_lr, betas=cfg.betas,
                                  fused=fused or None, capturable=capturable))
    return opts


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Linear warmup to 1 over ``warmup_steps``, then cosine decay to ``min_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_schedulers(optimizers: list[torch.optim.Optimizer], cfg: OptimConfig,
                     total_steps: int) -> list[torch.optim.lr_scheduler.LambdaLR]:
    fn = lambda step: lr_factor(step, total_steps, cfg.warmup_steps, cfg.min_lr_ratio)  # noqa: E731
    return [torch.optim.lr_scheduler.LambdaLR(opt, fn) for opt in optimizers]

"""torchrun integration: process group, device, DDP / FSDP2 wrapping, cross-rank reductions.

DistributedDataParallel and ``torch.distributed.fsdp.fully_shard`` do the work of the eager step. The
whole-step CUDA graph (``step_graph``, training/graphs.py) cannot contain DDP (its reducer runs autograd
hooks and bucket bookkeeping on the host), so there data parallelism is :class:`GradientAllReduce`: the
gradients live in one flat buffer whose buckets are all-reduced as the backward completes them, all captured
in the forward graph; the clip and the update then see the same mean gradient on every rank.
The MoE load counters are buffers that every rank fills from its own tokens; they are summed across
ranks before the router-bias update so that every rank applies the same bias (DDP's buffer
broadcast is turned off for that reason).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from ..checks import parse_device


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(name: str) -> torch.device:
    """The device of TrainConfig ``device``: "auto" is CUDA when there is one, else CPU."""
    if name != "auto":
        return parse_device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo(device=pick_device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank, world, local_rank, dev)


class GradientAllReduce:
    """Data parallelism for the whole-step CUDA graph: every trainable parameter's ``.grad`` is a view into
    one flat buffer, cut into buckets, and each gradient ends the step as its mean over ranks,
    g <- (1/W) sum_r g_r. No host work per step, so it is captured in the forward graph (NCCL collectives can
    be captured once the communicator exists: the uncaptured warm-up step runs the same all-reduces first).

    Overlapped with the backward as DDP does: the flat buffer holds the parameters in reverse registration
    order (roughly the order the backward finishes them) and a bucket's all-reduce is launched, asynchronously,
    by a post-accumulate-grad hook as soon as the last micro-batch's backward has finished every gradient in
    it (:meth:`arm` before that backward); :meth:`reduce`, after it, launches any bucket still waiting, waits
    for all of them and divides by W. ``bucket_mb = 0``: one all-reduce of the whole buffer, in :meth:`reduce`.
    Every rank runs the same backward, so the buckets launch in the same order on every rank.

    The views are attached by :meth:`attach` at the first step, not at construction: torch.distributed's
    optimizer ``state_dict`` (a resume) needs ``.grad`` unset while the optimizer has no state yet.
    Construction broadcasts rank 0's parameters and buffers, as DDP does, so every rank starts equal.
    Raises ``ValueError`` if the trainable parameters differ in dtype or device (one flat buffer).
    """

    def __init__(self, model: nn.Module, bucket_mb: float = 25.0):
        self.params = [p for p in model.parameters() if p.requires_grad][::-1]
        dtypes = {(p.dtype, p.device) for p in self.params}
        if len(dtypes) != 1:
            raise ValueError("GradientAllReduce needs every trainable parameter on one device in one dtype, "
                             f"got {dtypes}")
        self.world = dist.get_world_size()
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                dist.broadcast(t, src=0)
        self.flat = torch.zeros(sum(p.numel() for p in self.params), dtype=self.params[0].dtype,
                                device=self.params[0].device)
        cap = bucket_mb * 2**20 / self.flat.element_size() if bucket_mb > 0 else math.inf
        self.views, self.buckets, self.bucket_of = [], [], {}
        self.sizes = [0]  # gradients per bucket
        offset = start = 0
        for p in self.params:
            if offset > start and offset - start + p.numel() > cap:  # close the bucket: flat[start:offset]
                self.buckets.append(self.flat[start:offset])
                start, self.sizes = offset, [*self.sizes, 0]
            self.views.append(self.flat[offset:offset + p.numel()].view_as(p))
            self.bucket_of[p] = len(self.sizes) - 1
            self.sizes[-1] += 1
            offset += p.numel()
        self.buckets.append(self.flat[start:offset])
        self.pending: list[int] | None = None  # gradients each bucket still waits for; None: not armed
        self.works: dict[int, object] = {}
        if bucket_mb > 0:
            for p in self.params:
                p.register_post_accumulate_grad_hook(self._grad_ready)

    def attach(self) -> None:
        """Make every ``p.grad`` its view of the flat buffer (autograd then accumulates into it in place)."""
        for p, view in zip(self.params, self.views):
            if p.grad is not view:
                if p.grad is not None:
                    view.copy_(p.grad)
                p.grad = view

    def arm(self) -> None:
        """The next backward is the step's last: launch each bucket's all-reduce once its gradients are done."""
        self.pending, self.works = list(self.sizes), {}

    def _grad_ready(self, p: torch.Tensor) -> None:
        if self.pending is None:
            return
        b = self.bucket_of[p]
        self.pending[b] -= 1
        if self.pending[b] == 0:
            self.works[b] = dist.all_reduce(self.buckets[b], async_op=True)

    def reduce(self) -> None:
        """g <- mean over ranks of g, for every gradient (buckets not yet launched are launched now, in order)."""
        for b, bucket in enumerate(self.buckets):
            if b not in self.works:
                self.works[b] = dist.all_reduce(bucket, async_op=True)
        for b in sorted(self.works):
            self.works[b].wait()
        self.pending, self.works = None, {}
        self.flat.mul_(1.0 / self.world)


def all_gather_rows(local: torch.Tensor, counts: list[int]) -> Callable[[], torch.Tensor]:
    """Launch an all-gather in which rank r contributes ``counts[r]`` rows (``local``: this rank's, shape
    (counts[rank], ...), the same trailing shape and dtype on every rank); returns a function that waits for it
    and returns all ranks' rows in rank order, (sum(counts), ...). Rows are padded to max(counts) for the
    collective (all_gather_into_tensor needs equal sizes) and the padding dropped after it. No host sync, so it
    can be captured in a CUDA graph (as GradientAllReduce's all-reduces are)."""
    world, width = len(counts), max(counts)
    send = local if local.shape[0] == width else torch.cat([local, local.new_zeros(width - local.shape[0],
                                                                                   *local.shape[1:])])
    out = local.new_empty(world * width, *local.shape[1:])
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # the torch >= 2.13 name
    work = gather(out, send, async_op=True)

    def rows() -> torch.Tensor:
        work.wait()
        if all(c == width for c in counts):
            return out
        return torch.cat([out[r * width:r * width + c] for r, c in enumerate(counts)])

    return rows


def wrap_model(model: nn.Module, info: DistInfo, parallel: str, step_graph: bool = False) -> nn.Module:
    """DDP or FSDP2 (each Prelude/Coda block and the recurrent block sharded, then the root). With
    ``step_graph`` and DDP the model is left unwrapped: :class:`GradientAllReduce` does DDP's work."""
    if not info.enabled or (step_graph and parallel == "ddp"):
        return model
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in [*model.prelude, model.recurrent, *model.coda]:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[info.local_rank] if info.device.type == "cuda" else None,
                                   broadcast_buffers=False)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def barrier() -> None:
    """Wait for every rank (nothing to wait for in a single process)."""
    if dist.is_initialized():
        dist.barrier()


def all_reduce_(tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=op)
    return tensor


def mean_across_ranks(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()

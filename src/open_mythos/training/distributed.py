"""torchrun integration: process group, device, DDP / FSDP2 wrapping, cross-rank reductions.

DistributedDataParallel and ``torch.distributed.fsdp.fully_shard`` do the work of the eager step. The
whole-step CUDA graph (``step_graph``, training/graphs.py) cannot contain DDP (its reducer runs autograd
hooks and bucket bookkeeping on the host), so there data parallelism is :class:`GradientAllReduce`: the
gradients live in one flat buffer and one all-reduce of it, captured in the forward graph after the
backward, averages them across ranks; the clip and the update then see the same gradients on every rank.
The MoE load counters are buffers that every rank fills from its own tokens; they are summed across
ranks before the router-bias update so that every rank applies the same bias (DDP's buffer
broadcast is turned off for that reason).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


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
    if name != "auto":
        return torch.device(name)
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
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank, world, local_rank, dev)


class GradientAllReduce:
    """Data parallelism for the whole-step CUDA graph: every trainable parameter's ``.grad`` is a view into
    one flat buffer, and :meth:`reduce` replaces it by its mean over ranks, g <- (1/W) sum_r g_r: one
    all-reduce, with no host work, so it is captured in the forward graph (NCCL collectives can be captured
    once the communicator is set up: the uncaptured warm-up step runs this same all-reduce first).

    The views are attached by :meth:`attach` at the first step, not at construction: torch.distributed's
    optimizer ``state_dict`` (a resume) needs ``.grad`` unset while the optimizer has no state yet.
    Construction broadcasts rank 0's parameters and buffers, as DDP does, so every rank starts equal.
    Raises ``ValueError`` if the trainable parameters differ in dtype or device (one flat buffer).
    """

    def __init__(self, model: nn.Module):
        self.params = [p for p in model.parameters() if p.requires_grad]
        dtypes = {(p.dtype, p.device) for p in self.params}
        if len(dtypes) != 1:
            raise ValueError(f"GradientAllReduce needs every trainable parameter on one device in one dtype, got {dtypes}")
        self.world = dist.get_world_size()
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                dist.broadcast(t, src=0)
        self.flat = torch.zeros(sum(p.numel() for p in self.params), dtype=self.params[0].dtype,
                                device=self.params[0].device)
        self.views, offset = [], 0
        for p in self.params:
            self.views.append(self.flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()

    def attach(self) -> None:
        """Make every ``p.grad`` its view of the flat buffer (autograd then accumulates into it in place)."""
        for p, view in zip(self.params, self.views):
            if p.grad is not view:
                if p.grad is not None:
                    view.copy_(p.grad)
                p.grad = view

    def reduce(self) -> None:
        """g <- mean over ranks of g, for every gradient at once."""
        dist.all_reduce(self.flat)
        self.flat.mul_(1.0 / self.world)


def wrap_model(model: nn.Module, info: DistInfo, parallel: str, step_graph: bool = False) -> nn.Module:
    """DDP or FSDP2 (each Prelude/Coda block and the recurrent block sharded, then the root). With
    ``step_graph`` and DDP the model is left unwrapped: :class:`GradientAllReduce` does DDP's work."""
    if not info.enabled or (step_graph and parallel == "ddp"):
        return model
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        model.recurrent.cast_matrices_once = False  # its parameters are sharded outside its own forward
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

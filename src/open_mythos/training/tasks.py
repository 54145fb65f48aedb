"""Synthetic tasks as a training data source: ``data.source = "task"``, ``data.task = NAME``.

A task generates problems on the fly: ``task.batch(n, rng, n_loops)`` returns (tokens (n, seq_len),
targets (n, seq_len)), targets -100 where nothing is supervised (the Trainer's loss ignores them).
``n_loops`` is the step's loop count, so a task can supervise only what that many loops can resolve
(a depth curriculum; the fixed-depth baseline passes ``None``: everything supervised).

Batches are resume-exact: batch i of a run is drawn from ``random.Random(seed * 1_000_003 + i)``,
and the loader's state is the batch index. Every rank draws the whole global batch and keeps its
rows (problems are cheap; the global batch is then the same for any world size).
"""

from __future__ import annotations

import importlib
import inspect
import random
from typing import Callable, Protocol

import torch

# task name -> "module:class"; the class is built with ``data.task_args`` as keyword arguments
TASKS = {
    "khop": "open_mythos.experiments.khop:KHopTask",
    "prefix_sums": "open_mythos.experiments.prefix_sums:PrefixSumTask",
    "phop": "open_mythos.experiments.phop:PHopTask",
}


class Task(Protocol):
    vocab_size: int
    seq_len: int

    def batch(self, n: int, rng: random.Random, n_loops: int | None) -> tuple[torch.Tensor, torch.Tensor]: ...


def build_task(name: str, args: dict) -> Task:
    """The task ``name`` (a key of ``TASKS``) built with keyword arguments ``args`` (``data.task_args``).
    Raises ValueError for an unknown name or argument, and whatever the task's own checks raise."""
    if name not in TASKS:
        raise ValueError(f"data.task must be one of {sorted(TASKS)}, got {name!r}")
    if not isinstance(args, dict):
        raise ValueError(f"data.task_args must be a table of the task's arguments, got {args!r}")
    module, name_in_module = TASKS[name].split(":")
    cls = getattr(importlib.import_module(module), name_in_module)
    known = inspect.signature(cls).parameters
    unknown = sorted(set(args) - set(known))
    if unknown:
        raise ValueError(f"unknown data.task_args for task {name!r}: {', '.join(unknown)} "
                         f"(known: {', '.join(known)})")
    return cls(**args)


class TaskLoader:
    """Resumable batches of a :class:`Task`; batch i belongs to step i // grad_accum, whose loop count
    ``loops_at(step)`` is passed to the task (None: the task supervises every target)."""

    def __init__(self, task: Task, global_batch: int, seed: int, loops_at: Callable[[int], int | None],
                 grad_accum: int = 1, rank: int = 0, world_size: int = 1):
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by world size {world_size}")
        self.task, self.global_batch, self.seed, self.loops_at = task, global_batch, seed, loops_at
        self.grad_accum, self.rank, self.world_size = grad_accum, rank, world_size
        self.index = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, targets), each (global_batch / world_size, task.seq_len)."""
        rng = random.Random(self.seed * 1_000_003 + self.index)
        x, y = self.task.batch(self.global_batch, rng, self.loops_at(self.index // self.grad_accum))
        self.index += 1
        return x[self.rank::self.world_size], y[self.rank::self.world_size]

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = int(state["index"])

"""How the trainer runs the recurrent loop fast: compiled blocks, activation checkpointing, matrices cast once.

The model holds the architecture only; these are driver choices, applied from here:

* :func:`compile_blocks` compiles every Prelude/Coda block (``nn.Module.compile``) and one recurrent
  iteration (``RecurrentBlock.iteration``: injection + LoRA + transformer body) with the ACT bookkeeping
  after it (``RecurrentBlock.halt``). The loop stays in Python, so any loop count runs without
  recompiling; with a cache (decoding) the eager iteration runs.
* :class:`LoopRunner` is passed to ``OpenMythos.forward(..., loop_runner=...)``: it runs the loop with the
  compiled iteration, with activation checkpointing of each loop (``checkpoint_loops``), and, training under
  autocast, with the shared block's matrices cast to the autocast dtype once for all loops instead of once
  per loop inside each compiled iteration (eager autocast's weight cache does the same for F.linear); their
  gradient is then summed over the loops in that dtype (as FSDP2's mixed precision does) and cast back to
  fp32 once. Not with activation checkpointing (its recomputation runs after the forward, on the fp32
  parameters), not under FSDP (parameters are sharded outside the block's own forward), and not with
  CUDA-graph trees (they treat parameters as static inputs: matrices cast per forward would be new tensors
  at every call and re-record the graphs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..layers import compute_dtype
from ..model import OpenMythos

CUDAGRAPH_COMPILE_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that add cudagraph trees


@dataclass
class LoopRunner:
    """``loop_runner`` for ``OpenMythos.forward``: runs ``RecurrentBlock.forward`` with these choices."""

    iteration: Callable | None = None   # compiled RecurrentBlock.iteration (None: eager)
    halt: Callable | None = None        # compiled RecurrentBlock.halt
    checkpoint_loops: bool = False      # recompute each loop in backward
    cast_matrices_once: bool = True     # under autocast with autograd: cast the shared matrices once per forward

    def __call__(self, recurrent: torch.nn.Module, e: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                 n_loops: int, cache, backprop_loops: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        kwargs = dict(iteration=self.iteration, halt=self.halt, checkpoint_iterations=self.checkpoint_loops)
        dtype = compute_dtype(e)
        if self.cast_matrices_once and not self.checkpoint_loops and torch.is_grad_enabled() and dtype != e.dtype:
            return torch.func.functional_call(recurrent, recurrent.matrices_in(dtype),
                                              (e, rope, n_loops, cache, backprop_loops), kwargs)
        return recurrent(e, rope, n_loops, cache, backprop_loops, **kwargs)


def compile_blocks(model: OpenMythos, checkpoint_loops: bool = False, **compile_kwargs) -> LoopRunner:
    """torch.compile the Prelude/Coda blocks in place and return the LoopRunner with the compiled recurrent
    iteration (pass it as ``model(..., loop_runner=runner)``). ``compile_kwargs`` go to torch.compile."""
    for block in [*model.prelude, *model.coda]:
        block.compile(**compile_kwargs)
    rec = model.recurrent
    return LoopRunner(torch.compile(rec.iteration, **compile_kwargs), torch.compile(rec.halt, **compile_kwargs),
                      checkpoint_loops=checkpoint_loops,
                      cast_matrices_once=compile_kwargs.get("mode") not in CUDAGRAPH_COMPILE_MODES)

"""The whole training step as CUDA graphs (``step_graph = true``): no launch overhead, no autograd on the CPU.

Compiled blocks still launch each kernel from Python, and autograd walks its graph on the CPU every
step: at the SPEC size the GPU waits on the host for part of every step. With ``step_graph`` a step
is two graph replays:

    forward graph, one per loop count n:  zero the gradients, forward with n loops, loss, backward,
                                          clip  ->  (loss, mean ACT depth, grad norm), found_inf
    update graph, one:                    every optimizer's step, learning rates read from device tensors;
                                          skipped on the device where found_inf = 1

The host launches both graphs back to back and only then reads the loss and grad norm (the step's one
sync): launching a graph of ~1,500 kernels costs ~2 ms of host time, which now overlaps the forward
graph's execution. A non-finite loss or grad norm sets ``found_inf``, and every optimizer leaves its
parameters and state untouched (torch's fused AdamW reads a ``found_inf`` attribute, as under
GradScaler; BatchedMuon does the same); the host then skips the schedulers, as the eager trainer does.
A loop count's first step runs uncaptured, on the capture stream (it compiles, and warms up cuBLAS /
cuDNN there); its next step is captured, later ones replay.

* Gradients are static tensors (kept from the first step, zeroed inside the forward graph), so one
  update graph serves every loop count. A parameter that gets no gradient in a step is updated with a
  zero gradient (the eager trainer skips it).
* Each replay reads its batch from static input buffers; the learning rates, which the schedulers keep
  writing to ``param_groups`` as floats, are copied into the device tensors the update graph reads.
* All graphs share one memory pool: a graph's outputs are copied out before another graph replays.

Under torchrun with ``parallel = "ddp"`` the forward graph also holds the data parallelism: the gradient
buckets' all-reduces, launched as the backward completes them and waited on before the clip
(distributed.GradientAllReduce).

On a CPU the same steps run uncaptured, which is what the tests exercise. On a GPU: bf16.
"""

from __future__ import annotations

import contextlib

import torch


class StepGraphs:
    def __init__(self, trainer):
        self.trainer = trainer
        self.capture = trainer.device.type == "cuda"
        self.stream = torch.cuda.Stream(trainer.device) if self.capture else None
        self.warm: set[int] = set()         # loop counts whose first (uncaptured) step has run
        self.stepped = False                # an uncaptured optimizer step has created the optimizer state
        self.forward_graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.update_graph: torch.cuda.CUDAGraph | None = None
        self.lrs: list[tuple[torch.Tensor, dict]] = []  # (device lr, param group) for the update graph
        self.inputs: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.found_inf = torch.zeros((), device=trainer.device)  # 1.0: this step's loss or grad norm is not finite
        self.pool = None

    def ready(self, n_loops: int) -> bool:
        """Whether a step with ``n_loops`` loops runs as graphs (else: uncaptured, in :meth:`warmup`)."""
        return n_loops in self.warm and self.stepped

    @contextlib.contextmanager
    def warmup(self, n_loops: int, optimizer_step: bool = False):
        """Context for an uncaptured step (its forward/backward, or its ``optimizer_step``): runs it on the
        capture stream, then keeps its gradients as the static ones."""
        if self.capture:
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                yield
            torch.cuda.current_stream().wait_stream(self.stream)
        else:
            yield
        self.warm.add(n_loops)
        self.stepped |= optimizer_step
        for p in self.trainer.model.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)

    def forward_backward(self, n_loops: int, batches: list[tuple[torch.Tensor, torch.Tensor]]
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Replay (capturing first if new) the forward graph for ``n_loops`` on ``batches``; returns copies
        of (summed loss, mean ACT depth, grad norm)."""
        if self.inputs is None:  # fresh tensors: on a CPU .to() would alias the loader's batch
            device = self.trainer.device
            self.inputs = [(torch.empty_like(x, device=device), torch.empty_like(y, device=device)) for x, y in batches]
        for (xs, ys), (x, y) in zip(self.inputs, batches):
            xs.copy_(x, non_blocking=True)
            ys.copy_(y, non_blocking=True)
        if not self.capture:
            return self._forward_backward(n_loops).unbind(0)
        if n_loops not in self.forward_graphs:
            self.forward_graphs[n_loops] = self._record(lambda: self._forward_backward(n_loops))
        graph, out = self.forward_graphs[n_loops]
        graph.replay()
        return out.clone().unbind(0)

    def _forward_backward(self, n_loops: int) -> torch.Tensor:
        trainer = self.trainer
        loss_sum, depth = trainer.forward_backward(n_loops, self.inputs, zero_grads=True)
        trainer.reduce_gradients()  # under torchrun: the mean gradient over ranks, captured here
        grad_norm = trainer.clip_gradients()
        self.found_inf.copy_(~(torch.isfinite(loss_sum) & torch.isfinite(grad_norm)))
        return torch.stack([loss_sum, depth, grad_norm])

    def update(self, capture: bool = True) -> None:
        """Every optimizer's step, as the update graph (recorded on first use); a step whose forward graph set
        ``found_inf`` changes nothing. ``capture=False``: the same step uncaptured, after an uncaptured forward
        (a finite one: the host checked), so the optimizers compile their captured code path outside capture."""
        for lr, group in self.lrs:
            lr.fill_(group["lr"])
        if not capture:
            self.found_inf.zero_()
        if not (capture and self.capture):
            self._update()
            return
        if self.update_graph is None:
            groups = [g for opt in self.trainer.optimizers for g in opt.param_groups]
            self.lrs = [(torch.tensor(float(g["lr"]), device=self.trainer.device), g) for g in groups]
            floats = [g["lr"] for g in groups]
            try:  # optimizers read these tensors while the graph is recorded; param_groups keep floats
                for lr, g in self.lrs:
                    g["lr"] = lr
                self.update_graph, _ = self._record(self._update)
            finally:
                for g, value in zip(groups, floats):
                    g["lr"] = value
        self.update_graph.replay()

    def _update(self) -> None:
        for opt in self.trainer.optimizers:
            opt.found_inf = self.found_inf  # read while the step runs (or is recorded): skip on the device
            try:
                opt.step()
            finally:
                del opt.found_inf

    def _record(self, fn) -> tuple[torch.cuda.CUDAGraph, object]:
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        # under torchrun the NCCL watchdog thread queries events while this thread captures: capture errors
        # are then this thread's own ("thread_local"), else its queries would invalidate the capture
        mode = "thread_local" if self.trainer.grad_sync is not None else "global"
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode=mode):
            out = fn()
        self.pool = graph.pool()
        return graph, out

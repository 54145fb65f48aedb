"""CUDA-graph replay of the engine's stages, and their scoped compilation.

A decode stage of a small looped model is hundreds of tiny kernels; launched one by one from
Python they cost far more than they compute. ``StageGraphs`` records each stage once per shape key
(stage, batch bucket, ...) into a ``torch.cuda.CUDAGraph`` and afterwards replays it with one
launch. The first call of a key runs eagerly (real work that also warms up cuBLAS, compiles and
allocates the cache buffers); the second captures (capturing launches nothing, so it has no side
effects) and replays. Stages read and write the engine's persistent state tensors in place, so only
the per-call inputs (row indices, tokens) are copied into the graph's static inputs. A graph's
outputs are static tensors, overwritten by its next replay: consume them before that.

Nothing may free CUDA memory or synchronise while a graph is being captured. Python's cyclic garbage
collector can run at any allocation and free an unreachable object that owns CUDA graphs (an engine
of an earlier batch size in the same process, say): their memory pools are returned with ``cudaFree``,
which invalidates the capture (``cudaErrorStreamCaptureInvalidated``). So a capture first collects
garbage, then runs with the collector paused (torch's ``torch.cuda.graph`` no longer collects by default).
"""

from __future__ import annotations

import contextlib
import functools
import gc
from typing import Callable, Iterator

import torch


@contextlib.contextmanager
def no_garbage_collection() -> Iterator[None]:
    """Collect garbage now, then keep the cyclic collector off until the block ends."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class StageGraphs:
    def __init__(self, capture: Callable | None = None):
        self._seen: set[tuple] = set()
        self._graphs: dict[tuple, tuple[object, list[torch.Tensor], object]] = {}
        self._pool = None
        self._capture = capture or self._capture_cuda  # (stage, static inputs) -> (graph, outputs)

    def __call__(self, key: tuple, stage: Callable, *inputs: torch.Tensor):
        if key not in self._seen:
            self._seen.add(key)
            return stage(*inputs)
        if key not in self._graphs:
            static_inputs = [x.clone() for x in inputs]
            with no_garbage_collection():
                graph, outputs = self._capture(stage, static_inputs)
            self._graphs[key] = (graph, static_inputs, outputs)
        graph, static_inputs, outputs = self._graphs[key]
        for static, x in zip(static_inputs, inputs):
            static.copy_(x)
        graph.replay()
        return outputs

    def __len__(self) -> int:
        """Number of captured graphs."""
        return len(self._graphs)

    def _capture_cuda(self, stage: Callable, static_inputs: list[torch.Tensor]):
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        torch.cuda.synchronize()
        with torch.cuda.graph(graph, pool=self._pool):
            outputs = stage(*static_inputs)
        return graph, outputs


def scoped_compile(fn: Callable, n_buckets: int, n_stages: int) -> Callable:
    """torch.compile(fn, dynamic=False) for one engine stage: one compiled variant per batch bucket.

    Dynamo counts a function's compiled variants over the whole process (every engine's); past its limits
    (default 8) a stage would silently run uncompiled. The limits are raised by this stage's needs only
    while it runs (a config patch around each call), never for the rest of the process."""
    compiled = torch.compile(fn, dynamic=False)
    dynamo = torch._dynamo.config
    limits = dict(recompile_limit=dynamo.recompile_limit + 2 * n_buckets,
                  accumulated_recompile_limit=dynamo.accumulated_recompile_limit + 2 * n_stages * n_buckets)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        with dynamo.patch(**limits):
            return compiled(*args, **kwargs)

    return call

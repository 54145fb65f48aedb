"""CUDA-graph replay of the engine's stages.

A decode stage of a small looped model is hundreds of tiny kernels; launched one by one from
Python they cost far more than they compute. ``StageGraphs`` records each stage once per shape key
(stage, batch bucket, ...) into a ``torch.cuda.CUDAGraph`` and afterwards replays it with one
launch. The first call of a key runs eagerly (real work that also warms up cuBLAS and allocates
the cache buffers); the second captures (capturing launches nothing, so it has no side effects)
and replays. Stages read and write the engine's persistent state tensors in place, so only the
per-call inputs (row indices, tokens) are copied into the graph's static inputs. A graph's
outputs are static tensors, overwritten by its next replay: consume them before that.
"""

from __future__ import annotations

from typing import Callable

import torch


class StageGraphs:
    def __init__(self):
        self._seen: set[tuple] = set()
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], object]] = {}
        self._pool = None

    def __call__(self, key: tuple, stage: Callable, *inputs: torch.Tensor):
        if key not in self._seen:
            self._seen.add(key)
            return stage(*inputs)
        if key not in self._graphs:
            static_inputs = [x.clone() for x in inputs]
            graph = torch.cuda.CUDAGraph()
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            torch.cuda.synchronize()
            with torch.cuda.graph(graph, pool=self._pool):
                outputs = stage(*static_inputs)
            self._graphs[key] = (graph, static_inputs, outputs)
        graph, static_inputs, outputs = self._graphs[key]
        for static, x in zip(static_inputs, inputs):
            static.copy_(x)
        graph.replay()
        return outputs

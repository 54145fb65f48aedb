"""Shared benchmark plumbing: environment description, CUDA timing, JSON report."""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without install


def env_info() -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "command": " ".join(sys.argv)}
    if torch.cuda.is_available():
        info |= {"device": torch.cuda.get_device_name(), "cuda": torch.version.cuda,
                 "sm_count": torch.cuda.get_device_properties(0).multi_processor_count}
    else:
        info["device"] = platform.processor() or "cpu"
    return info


def timed(fn) -> tuple[float, object]:
    """(seconds, result) of one call, synchronised around it on CUDA."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def time_fn(fn, warmup: int = 3, iters: int = 10) -> float:
    """Median seconds per call (synchronised around each call on CUDA)."""
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn)[0] for _ in range(iters))


GRAPH_REPEATS = 50  # calls per CUDA graph in graph_time


def graph_time(fn, *args, repeats: int = GRAPH_REPEATS) -> float:
    """Microseconds per call of ``fn(*args)``, from a CUDA graph of ``repeats`` back-to-back calls
    (best of 5 replays): the kernels' time without launch overhead."""
    for _ in range(3):  # compile / autotune / cuBLAS warm-up outside the graph
        fn(*args)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            fn(*args)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(5):
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / repeats)
    return best


def write_report(name: str, report: dict, out_dir: str | None) -> None:
    text = json.dumps(report, indent=1)
    print(text)
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / f"{name}.json").write_text(text)

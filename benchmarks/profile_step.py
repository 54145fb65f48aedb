"""Where a compiled SPEC training step spends its time: wall time vs GPU time per phase (forward,
loss, backward, optimizer: the ``record_function`` labels in ``Trainer.train_step``), the top CUDA
kernels by their own time, and (``--sdpa``) the SDPA backends at the SPEC shape.

    python benchmarks/profile_step.py --attn gqa [--set compile_mode='reduce-overhead'] [--sdpa]
    python benchmarks/profile_step.py --attn gqa --set step_graph=true   # also: each graph's GPU time
    python benchmarks/profile_step.py --attn gqa --set step_graph=true --dense-bound   # MoE at its dense bound

A phase whose GPU time is well below its wall time is CPU/launch-bound.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from common import time_fn
from moe import dense_bound_moe
from train_step import SPEC

from open_mythos.moe import MoE
from open_mythos.training.config import load_config
from open_mythos.training.loop import Trainer


def sdpa_table() -> None:
    B, H, T = 8, 16, 1024
    shapes = {"gqa_h128_kv4": (64, 64, 4), "mha_h64": (64, 64, 16), "mla_192_128": (192, 128, 16)}
    for name, (dqk, dv, hk) in shapes.items():
        q = torch.randn(B, H, T, dqk, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(B, hk, T, dqk, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(B, hk, T, dv, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for be in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                   SDPBackend.MATH):
            def run():
                with sdpa_kernel([be]):
                    F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=hk != H).sum().backward()
            try:
                print(f"sdpa {name:14s} {be.name:20s} {time_fn(run, 2, 5) * 1e3:8.2f} ms fwd+bwd")
            except RuntimeError as err:
                print(f"sdpa {name:14s} {be.name:20s} unsupported ({str(err).splitlines()[0][:80]})")


PHASES = ("forward", "loss", "backward", "optimizer")  # Trainer.train_step's record_function labels
# kernel-name patterns -> category, first match wins (CUDA kernels only: their names, not aten ops)
CATEGORIES = [("attention", ("sdpa", "flash", "fmha", "attention")),
              ("grouped GEMM", ("cutlass", "grouped")),
              ("GEMM", ("nvjet", "gemm", "sm90_xmma", "cublas")),
              ("sort / top-k", ("sort", "topk", "radix")),
              ("optimizer (foreach / fused)", ("multi_tensor", "foreach", "fused_adam")),
              ("triton (fused by inductor)", ("triton_",)),
              ("copy", ("memcpy", "memset", "copy")),
              ("elementwise / reduce (aten)", ("elementwise", "reduce", "index"))]


def print_categories(events) -> None:
    """GPU time by kernel category: which kind of work the step is made of."""
    totals: dict[str, float] = {}
    for e in events:
        if (e.self_device_time_total <= 0 or e.device_type != torch.autograd.DeviceType.CUDA
                or e.key in PHASES or e.key.startswith("Optimizer.")):
            continue  # record_function ranges, not kernels
        name = e.key.lower()
        cat = next((c for c, pats in CATEGORIES if any(p in name for p in pats)), "other")
        totals[cat] = totals.get(cat, 0.0) + e.self_device_time_total / 1e3
    for cat, ms in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  kernels {cat:30s} {ms:7.2f} ms")


def graph_kernels(graph: torch.cuda.CUDAGraph) -> list[tuple[str, float]]:
    """The CUDA kernels of one replay of ``graph``, in launch order: (name, microseconds)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return [(e.name, e.time_range.elapsed_us()) for e in sorted(kernels, key=lambda e: e.time_range.start)]


def host_breakdown(trainer, steps: int = 20) -> None:
    """Median host (wall) time of each part of a step: where the GPU may wait on the CPU."""
    spent: dict[str, list[float]] = {}

    def timed(obj, name: str, label: str) -> None:
        fn = getattr(obj, name)

        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            spent.setdefault(label, []).append(time.perf_counter() - t0)
            return out
        setattr(obj, name, wrapper)

    timed(trainer.train_loader, "next_batch", "next_batch (CPU)")
    timed(trainer.graphs, "forward_backward", "forward graph: input copy + launch")
    timed(trainer.graphs, "update", "update graph: lr fill + launch")
    timed(trainer, "train_step", "whole step (ends with a sync)")
    for _ in range(steps):
        trainer.train_step()
    for label, times in spent.items():
        print(f"host {label:38s} median {statistics.median(times) * 1e3:7.2f} ms   min {min(times) * 1e3:7.2f} ms")


def write_timeline(trainer, path: str) -> None:
    (graph, _), = trainer.graphs.forward_graphs.values()
    timeline = {"forward_backward": graph_kernels(graph), "update": graph_kernels(trainer.graphs.update_graph)}
    Path(path).write_text(json.dumps(timeline))
    for name, kernels in timeline.items():
        print(f"timeline {name}: {len(kernels)} kernels, {sum(us for _, us in kernels) / 1e3:.2f} ms", flush=True)


def loop_sweep_times(trainer, loop_counts: list[int]) -> None:
    """GPU time of the forward+backward graph for each loop count: the slope is the cost of one loop."""
    for n in loop_counts:
        trainer.cfg.loops.mean = trainer.cfg.loops.max_sampled = n
        for _ in range(3):
            trainer.train_step()
        graph, _ = trainer.graphs.forward_graphs[n]
        print(f"loop sweep: {n} loops, forward+backward graph {time_fn(graph.replay, 2, 5) * 1e3:.2f} ms", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--attn", default="gqa")
    p.add_argument("--set", nargs="*", default=[],
                   help="extra TrainConfig overrides, e.g. compile_mode='reduce-overhead'")
    p.add_argument("--sdpa", action="store_true", help="also time each SDPA backend at the SPEC shape")
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--timeline", help="step_graph: write each graph's kernels in launch order (name, us) to this JSON")
    p.add_argument("--host", action="store_true", help="step_graph: host time of each part of a step (20 steps)")
    p.add_argument("--loop-sweep", nargs="*", type=int, default=[],
                   help="step_graph: forward+backward graph GPU time at these loop counts (per-loop cost = slope)")
    p.add_argument("--dense-bound", action="store_true",
                   help="profile with every MoE replaced by moe.dense_bound_moe (timing ceiling, not a model)")
    args = p.parse_args()
    if args.dense_bound:
        MoE.forward = dense_bound_moe
    if args.sdpa:
        sdpa_table()
    cfg = load_config("shakespeare-tiny", overrides=[*SPEC, f"model.attn_type='{args.attn}'", "compile=true",
                                                      "out_dir='/tmp/prof'", *args.set])
    trainer = Trainer(cfg, progress=False)
    for _ in range(3):
        trainer.train_step()
    steps = [trainer.train_step()["tokens_per_s"] for _ in range(3)]
    print(f"{args.attn} {' '.join(args.set)}: tokens/s without profiler {[round(t) for t in steps]}", flush=True)
    if trainer.graphs is not None:  # step_graph: the graphs' own GPU time vs the step's wall time
        (graph, _), = trainer.graphs.forward_graphs.values()
        fb, upd = (time_fn(lambda g=g: g.replay(), 2, 5) * 1e3 for g in (graph, trainer.graphs.update_graph))
        wall = 8192 / max(steps) * 1e3
        print(f"step graphs: forward+backward {fb:.2f} ms, update {upd:.2f} ms; best step {wall:.2f} ms wall "
              f"-> {wall - fb - upd:.2f} ms outside the graphs", flush=True)
    if trainer.graphs is not None and args.host:
        host_breakdown(trainer)
    if trainer.graphs is not None and args.timeline:
        write_timeline(trainer, args.timeline)
    if trainer.graphs is not None and args.loop_sweep:
        loop_sweep_times(trainer, args.loop_sweep)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        rec = trainer.train_step()
    events = prof.key_averages()
    kernels_ms = sum(e.self_device_time_total for e in events) / 1e3
    print(f"profiled step: {8192 / rec['tokens_per_s'] * 1e3:.1f} ms wall, {kernels_ms:.1f} ms of GPU kernels")
    for e in events:
        if e.key in PHASES:
            print(f"  phase {e.key:10s} CPU {e.cpu_time_total / 1e3:7.1f} ms   GPU {e.device_time_total / 1e3:7.1f} ms")
    print_categories(events)
    print(events.table(sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=70))
    print("host side (CPU time by op; with step_graph: graph launches, copies, syncs):")
    print(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=70))


if __name__ == "__main__":
    main()

"""Where a compiled SPEC training step spends its time: wall time vs GPU time per phase (forward,
loss, backward, optimizer: the ``record_function`` labels in ``Trainer.train_step``), the top CUDA
kernels by their own time, and (``--sdpa``) the SDPA backends at the SPEC shape.

    python benchmarks/profile_step.py --attn gqa [--set compile_mode='reduce-overhead'] [--sdpa]
    python benchmarks/profile_step.py --attn gqa --set step_graph=true   # also: each graph's GPU time

A phase whose GPU time is well below its wall time is CPU/launch-bound.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from common import time_fn
from train_step import SPEC

from open_mythos.training.config import load_config
from open_mythos.training.loop import Trainer


def sdpa_table() -> None:
    B, H, T = 8, 16, 1024
    for name, (dqk, dv, hk) in {"gqa_h128_kv4": (64, 64, 4), "mha_h64": (64, 64, 16), "mla_192_128": (192, 128, 16)}.items():
        q = torch.randn(B, H, T, dqk, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(B, hk, T, dqk, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(B, hk, T, dv, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for be in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--attn", default="gqa")
    p.add_argument("--set", nargs="*", default=[], help="extra TrainConfig overrides, e.g. compile_mode='reduce-overhead'")
    p.add_argument("--sdpa", action="store_true", help="also time each SDPA backend at the SPEC shape")
    p.add_argument("--rows", type=int, default=25)
    args = p.parse_args()
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


if __name__ == "__main__":
    main()

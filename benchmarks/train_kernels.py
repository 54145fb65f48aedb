"""The training step's narrow kernels: which implementation of each is fastest at the SPEC size?

    python benchmarks/train_kernels.py [--out benchmarks/results/h100/...]

Each candidate's time per call (bf16 unless said), measured as 50 back-to-back calls replayed from
one CUDA graph — the regime of ``step_graph``: kernel time only.

  topk    the router's top-4 of 64 scores for 8192 tokens (fp32): torch.topk sorted (as the MoE
          called it)  vs  sorted=False (as it does now: the gates need no order)  vs  a full sort of
          each row of 64, first 4 kept
  ns      one Newton-Schulz call (5 iterations, compiled, as BatchedMuon runs it) on the SPEC
          model's stacked matrix shapes: (a I + b A + c A^2) X, one epilogue on the small Gram matrix
          then a plain bmm (``optim.newton_schulz``)  vs  the previous a X + (b A + c A^2) X with both
          sums as baddbmm epilogues (each copies its input into its output first)
"""

from __future__ import annotations

import argparse

import torch

from common import GRAPH_REPEATS, env_info, graph_time, write_report

from open_mythos.training.optim import newton_schulz


def ns_epilogues(g: torch.Tensor, steps: int = 5, eps: float = 1e-7,
                 coefficients: tuple[float, float, float] = (3.4445, -4.775, 2.0315)) -> torch.Tensor:
    """The previous form: X <- a X + B X as ``baddbmm(X, B, X, beta=a)`` (copies X into its output first)."""
    a, b, c = coefficients
    x = g.bfloat16()
    transposed = g.shape[-2] > g.shape[-1]
    if transposed:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        A = x @ x.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        x = torch.baddbmm(x, B, x, beta=a)
    return x.mT if transposed else x


def bench_topk(dev) -> dict:
    scores = torch.rand(8192, 64, device=dev)
    k = 4
    return {
        "torch.topk": graph_time(lambda: torch.topk(scores, k, dim=-1).indices),
        "topk_unsorted": graph_time(lambda: torch.topk(scores, k, dim=-1, sorted=False).indices),
        "sort_first_k": graph_time(lambda: scores.sort(dim=-1, descending=True).indices[:, :k]),
    }


def bench_ns(dev) -> dict:
    shapes = {"experts_gate_up": (128, 256, 1024), "experts_down": (64, 1024, 256),
              "ffn_in": (8, 2752, 1024), "ffn_out": (4, 1024, 2752), "attn_square": (10, 1024, 1024)}
    current, previous = torch.compile(newton_schulz), torch.compile(ns_epilogues)
    out = {}
    for name, shape in shapes.items():
        g = torch.randn(*shape, device=dev)
        out[name] = {"shape": list(shape), "gram_epilogue_plain_bmm": graph_time(current, g),
                     "both_epilogues": graph_time(previous, g)}
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("train_kernels.py times CUDA-graph replays: it needs a GPU")
    dev = "cuda"
    torch.manual_seed(0)
    report = {"env": env_info(), "unit": f"us per call, {GRAPH_REPEATS} calls per CUDA graph, best of 5 replays",
              "topk": bench_topk(dev), "ns": bench_ns(dev)}
    write_report("train_kernels", report, args.out)


if __name__ == "__main__":
    main()

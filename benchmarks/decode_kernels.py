"""Batch-1 decode is hundreds of tiny kernels: which implementation of each is fastest?

    python benchmarks/decode_kernels.py [--rows 1 4] [--out benchmarks/results/h100]

For the SPEC config's decode shapes (bf16), the time per call of each candidate, measured as 50
back-to-back calls replayed from one CUDA graph (the regime of the engine's decode graphs: no
launch overhead, only kernel time and the gaps between kernels):

  linear  y = x W^T, x (rows, K):  cuBLAS (F.linear)  vs  torch.compile of the same (inductor may
          pick its own kernel)  vs  compiled ``layers.matvec``: (x[:, None, :] * W).sum(-1) in fp32,
          a reduction kernel that spreads the N outputs over many thread blocks
  bmm     gathered experts (rows*k, K) by (rows*k, H, K): ``matvec`` eager (torch.bmm) vs compiled
  topk    top-4 of 64 router scores: torch.topk vs compiled ``moe.topk_by_rank`` vs k rounds of
          compiled argmax + mask
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from common import GRAPH_REPEATS, env_info, graph_time, write_report

from open_mythos.layers import matvec
from open_mythos.moe import topk_by_rank

def topk_rounds(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores per row by k rounds of argmax (ties: lowest index first)."""
    ids = []
    s = scores
    for _ in range(k):
        i = s.argmax(-1, keepdim=True)
        ids.append(i)
        s = s.scatter(-1, i, float("-inf"))
    return torch.cat(ids, -1)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", nargs="+", type=int, default=[1, 4])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    dev, bf = "cuda", torch.bfloat16
    torch._dynamo.config.recompile_limit = 64  # one compile per shape; past the default 8 dynamo would run eagerly
    compiled_linear = torch.compile(F.linear, dynamic=False)
    compiled_matvec = torch.compile(matvec, dynamic=False)
    compiled_rounds = torch.compile(topk_rounds, dynamic=False)
    compiled_rank = torch.compile(topk_by_rank, dynamic=False)
    # (name, N, K): GQA q / k+v / fused qkv / o, router, shared gate+up (2 x 256 each), router + shared gate+up
    # fused, shared down, LM head
    shapes = [("wq_or_wo", 1024, 1024), ("wk", 256, 1024), ("wqkv", 1536, 1024), ("router", 64, 1024),
              ("shared_w1", 512, 1024), ("router_shared_w13", 64 + 1024, 1024), ("shared_w2", 1024, 512),
              ("head", 32000, 1024)]
    rows_out = []
    for rows in args.rows:
        for name, n, k in shapes:
            x, w = torch.randn(rows, k, device=dev, dtype=bf), torch.randn(n, k, device=dev, dtype=bf) / k ** 0.5
            err = (compiled_matvec(x, w).float() - F.linear(x, w).float()).abs().max().item()
            rows_out.append({"op": "linear", "shape": name, "rows": rows, "N": n, "K": k,
                             "cublas_us": graph_time(F.linear, x, w),
                             "compiled_linear_us": graph_time(compiled_linear, x, w),
                             "compiled_reduce_us": graph_time(compiled_matvec, x, w), "max_abs_diff": err})
            print(rows_out[-1], flush=True)
        for name, n, k in [("expert_w1", 256, 1024), ("expert_w13", 512, 1024), ("expert_w2", 1024, 256)]:
            a = rows * 4
            x, w = torch.randn(a, k, device=dev, dtype=bf), torch.randn(a, n, k, device=dev, dtype=bf) / k ** 0.5
            rows_out.append({"op": "gathered_bmm", "shape": name, "rows": rows, "N": n, "K": k,
                             "bmm_us": graph_time(matvec, x, w),
                             "compiled_reduce_us": graph_time(compiled_matvec, x, w)})
            print(rows_out[-1], flush=True)
        scores = torch.rand(rows, 64, device=dev)
        ref = torch.topk(scores, 4).indices
        same = torch.equal(ref, compiled_rank(scores, 4)) and torch.equal(ref, topk_rounds(scores, 4))
        rows_out.append({"op": "topk", "shape": "64 choose 4", "rows": rows, "same_ids": same,
                         "torch_topk_us": graph_time(lambda s: torch.topk(s, 4), scores),
                         "compiled_topk_us": graph_time(torch.compile(lambda s: torch.topk(s, 4)), scores),
                         "compiled_rank_us": graph_time(compiled_rank, scores, 4),
                         "compiled_rounds_us": graph_time(compiled_rounds, scores, 4)})
        print(rows_out[-1], flush=True)
    write_report("decode_kernels", {"env": env_info(), "repeats_per_graph": GRAPH_REPEATS, "rows": rows_out}, args.out)


if __name__ == "__main__":
    main()

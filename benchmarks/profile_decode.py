"""Where decode time goes: prefill vs per-token decode, and the top CUDA kernels of a decode step.

    python benchmarks/profile_decode.py [--attn gqa] [--batch 1 16]

SPEC config, bf16, 8 loops, 128-token prompts, 64 new tokens (as benchmarks/decode.py). For each
batch size: the wall time of prefill alone (1 new token) and of the whole request, with the engine
as decode.py's fastest row (static schedule, compiled stages, CUDA graphs); then a torch.profiler
table of a compiled engine without CUDA graphs (the kernels a graph replays) and of one eager
128-token forward (a prefill without a CUDA graph).
"""

from __future__ import annotations

import argparse

import torch

from common import timed
from decode import GREEDY, spec_model

from open_mythos.inference import Engine, Request


def profile(fn, rows: int = 20, sort: str = "cuda_time_total") -> None:
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        fn()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=60))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--attn", default="gqa")
    p.add_argument("--batch", nargs="+", type=int, default=[1, 16])
    p.add_argument("--new-tokens", type=int, default=64)
    args = p.parse_args()
    model = spec_model(args.attn, "cuda")
    for batch in args.batch:
        prompts = torch.randint(0, model.cfg.vocab_size, (batch, 128), generator=torch.Generator().manual_seed(0))
        reqs = lambda n: [Request(r.tolist(), n, 8, GREEDY) for r in prompts]  # noqa: E731
        engine = Engine(model, max_batch=batch, schedule="static", max_len=128 + args.new_tokens, compile=True)
        for n in (1, args.new_tokens, args.new_tokens):  # warm-up: compile, then capture the graphs
            engine.run(reqs(n))
        t_prefill, _ = timed(lambda: engine.run(reqs(1)))
        t_all, _ = timed(lambda: engine.run(reqs(args.new_tokens)))
        decode = (t_all - t_prefill) / (args.new_tokens - 1)
        print(f"batch {batch}: prefill {t_prefill * 1e3:.1f} ms, whole {t_all * 1e3:.1f} ms "
              f"({batch * args.new_tokens / t_all:.0f} tok/s), decode {decode * 1e3:.2f} ms/token "
              f"({batch / decode:.0f} tok/s without prefill)", flush=True)
        eager = Engine(model, max_batch=batch, schedule="static", max_len=128 + 8, cuda_graphs=False, compile=True)
        eager.run(reqs(8))
        print(f"--- batch {batch}: compiled stages without graphs, 8 tokens (incl. prefill)")
        profile(lambda: eager.run(reqs(8)))
    ids = torch.randint(0, model.cfg.vocab_size, (1, 128), device="cuda")
    with torch.inference_mode():  # what a prefill costs without a CUDA graph: launch-bound
        model(ids, 8)
        t, _ = timed(lambda: model(ids, 8))
        print(f"--- one 128-token forward, eager: {t * 1e3:.1f} ms")
        profile(lambda: model(ids, 8), sort="cpu_time_total")


if __name__ == "__main__":
    main()

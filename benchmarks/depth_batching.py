"""Continuous depth-wise batching vs static batching, SPEC config (bf16, up to 8 loops).

    python benchmarks/depth_batching.py [--requests 64] [--max-batch 16] [--out benchmarks/results/h100]

Workload: ``--requests`` requests with random prompts (16..128 tokens), ``--new-tokens`` new tokens
each, greedy, loop budget ``--loops`` (default 8 = the trained depth; larger budgets run the loop
beyond it, as depth extrapolation does), ACT exit rule. The model is randomly initialised, so its halting unit
would halt every token at the same loop; it is given random weights scaled so the halting logit
w.h + b has standard deviation ``--halt-spread`` across tokens (its input's RMS is measured on a
prefill), which spreads the exit depths over 1..8 (the report gives the distribution).

Both schedules run the same requests with the same exit rule and the same compiled stages, replayed
from CUDA graphs (``--sync-every 1 2``: one depth run per number of loop iterations per tick, for each
``--prefill-batch``: waiting requests prefilled together, ahead of need, onto standby rows); the
report checks that every request's tokens and depths are identical and gives tokens/s, the ratio to
static, milliseconds per tick, and the recurrent-block row evaluations each run paid for.

Two throughputs per run: ``tokens_per_s`` over the whole run (all requests submitted at once, until
the last one finishes), and ``sustained_tokens_per_s`` over the part of it while requests were still
waiting for a slot (every slot busy: what a server under load delivers). They differ for the depth
schedule because requests whose tokens keep exiting late take many more ticks than the others, so
the run ends with a long drain in which a few deep requests hold a few slots.
"""

from __future__ import annotations

import argparse
import collections
import math
import time

import torch

from common import env_info, timed, write_report
from decode import spec_model

from open_mythos.inference import Engine, ExitRule, Request
from open_mythos.sampling import SamplingParams


def spread_halting(model, prompt: torch.Tensor, spread: float, bias: float) -> None:
    """Random halting direction w with std(w.h) = spread over the states the prefill visits."""
    seen = []
    hook = model.recurrent.act.proj.register_forward_hook(lambda m, inp, out: seen.append(inp[0].float()))
    with torch.inference_mode():
        model(prompt, 8)
    hook.remove()
    rms = torch.cat([s.flatten(0, -2) for s in seen]).pow(2).mean().sqrt().item()
    g = torch.Generator().manual_seed(0)
    w = torch.randn(model.cfg.dim, generator=g) * spread / (rms * math.sqrt(model.cfg.dim))
    with torch.no_grad():
        model.recurrent.act.proj.weight.copy_(w[None].to(model.recurrent.act.proj.weight))
        model.recurrent.act.proj.bias.fill_(bias)


def run_measured(engine: Engine, requests: list[Request]) -> tuple[dict, list[tuple[list[int], list[int]]]]:
    """Engine.run, step by step, timing the whole run, its sustained part (until no request waits),
    and the admissions (prefills: each ends in a host sync, so their wall time is their GPU time)."""
    ids = [engine.submit(r) for r in requests]
    outputs = {i: ([], []) for i in ids}
    admit, admit_s = engine.admit, [0.0]

    def timed_admit(events):
        t0 = time.perf_counter()
        admit(events)
        admit_s[0] += time.perf_counter() - t0

    engine.admit = timed_admit
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    begin, tokens, sustained = time.perf_counter(), 0, None
    while engine.has_work():
        for ev in engine.tick():
            outputs[ev.request_id][0].append(ev.token)
            outputs[ev.request_id][1].append(ev.depth)
            tokens += 1
        if sustained is None and not engine.waiting:
            sustained = (tokens, time.perf_counter() - begin)
    seconds = time.perf_counter() - begin
    return {"tokens_per_s": tokens / seconds, "seconds": seconds, "tokens": tokens,
            "sustained_tokens_per_s": sustained[0] / sustained[1], "sustained_tokens": sustained[0],
            "sustained_seconds": sustained[1], "admission_seconds": admit_s[0]}, [outputs[i] for i in ids]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--attn", default="gqa")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--loops", type=int, default=8)
    p.add_argument("--halt-spread", type=float, default=2.0)
    p.add_argument("--halt-bias", type=float, default=1.0)
    p.add_argument("--policy", default="per_loop")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--sync-every", nargs="+", type=int, default=[1],
                   help="depth schedule: loop iterations per tick (one depth run per value)")
    p.add_argument("--prefill-batch", nargs="+", type=int, default=[1],
                   help="depth schedule: waiting requests prefilled together onto standby rows (one run per value)")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    model = spec_model(args.attn, args.device)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, model.cfg.vocab_size, (int(torch.randint(16, 129, (1,), generator=g)),),
                             generator=g).tolist() for _ in range(args.requests)]
    spread_halting(model, torch.tensor([prompts[0]], device=args.device), args.halt_spread, args.halt_bias)
    reqs = [Request(pr, args.new_tokens, args.loops, SamplingParams(temperature=0), ExitRule("act"))
            for pr in prompts]
    runs = {}
    variants = [("static", 1, 1)] + [("depth", k, b) for b in args.prefill_batch for k in args.sync_every]
    for schedule, sync_every, prefill_batch in variants:
        engine = Engine(model, max_batch=args.max_batch, schedule=schedule, loop_policy=args.policy,
                        max_len=128 + args.new_tokens, max_loop_budget=args.loops, compile=args.compile,
                        sync_every=sync_every, prefill_batch=prefill_batch)
        name = schedule + ("" if sync_every == 1 else f"_sync_every_{sync_every}") + (
            "" if prefill_batch == 1 else f"_prefill_batch_{prefill_batch}")
        warm_s, _ = timed(lambda: engine.warmup(args.loops))  # every batch / prompt bucket: compile + capture
        print(f"{name}: warm-up {warm_s:.0f} s", flush=True)
        result, out = run_measured(engine, reqs)
        ticks, rows = engine.stats["ticks"], engine.stats["loop_rows"]
        runs[name] = result | {"loop_row_evaluations": rows, "ticks": ticks,
                               "ms_per_tick": 1e3 * result["seconds"] / ticks, "completions": out}
        if schedule == "depth":  # every depth tick runs sync_every loop iterations of each running row
            runs[name]["mean_running_rows"] = rows / (ticks * sync_every)
        print(name, {k: v for k, v in runs[name].items() if k != "completions"}, flush=True)
    same = all(a == b for name, r in runs.items() if name != "static"
               for a, b in zip(runs["static"]["completions"], r["completions"]))
    depths = collections.Counter(d for _, c in runs["static"]["completions"] for d in c[1:])
    total = sum(depths.values())
    for r in runs.values():
        del r["completions"]
    write_report(f"depth_batching_{args.attn}", {
        "benchmark": "depth_batching", "env": env_info(), "attn": args.attn, "loop_policy": args.policy,
        "requests": args.requests, "max_batch": args.max_batch, "new_tokens": args.new_tokens,
        "loop_budget": args.loops, "compiled_stages": args.compile, "exit_rule": "act",
        "halt_spread": args.halt_spread, "halt_bias": args.halt_bias,
        "exit_depth_distribution": {d: depths[d] / total for d in sorted(depths)},
        "mean_exit_depth": sum(d * c for d, c in depths.items()) / total,
        "outputs_identical": same, "results": runs,
        "speedup_vs_static": {k: r["tokens_per_s"] / runs["static"]["tokens_per_s"] for k, r in runs.items()},
        "sustained_speedup_vs_static": {k: r["sustained_tokens_per_s"] / runs["static"]["sustained_tokens_per_s"]
                                        for k, r in runs.items()}},
        args.out)


if __name__ == "__main__":
    main()

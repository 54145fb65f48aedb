"""Where a depth-schedule tick's time goes, at steady state with every slot busy.

    python benchmarks/profile_depth.py [--max-batch 64] [--loops 32]

SPEC config, bf16, compiled stages and CUDA graphs, the ACT-exit workload of depth_batching.py.
After warm-up, requests fill every slot; then it reports (milliseconds):
  tick_wall         one Engine.tick() (graph replay + host sync + scheduling in Python)
  <stage>_gpu       a stage's CUDA graph replayed back to back, per replay: depth_tick (start + loop +
                    finish), start, loop, loop_x4 (four loop iterations), finish
  <stage>_launch_host  host time of one replay's launch on an idle GPU
  overlap           40 ticks and one 64 x 128-token prefill, one after the other and concurrently
                    (two streams): whether prefills could hide behind ticks
and torch.profiler tables of a few ticks (by host time and by GPU time) in ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import torch

from decode import spec_model
from depth_batching import spread_halting

from open_mythos.inference import Engine, ExitRule, Request
from open_mythos.inference.graphs import StageGraphs
from open_mythos.sampling import SamplingParams


def gpu_ms(fn, n: int = 50) -> float:
    """Milliseconds per call of ``fn`` called back to back (CUDA events; launch overhead hidden when
    the GPU is the bottleneck)."""
    for _ in range(3):  # a graph key's first call runs eagerly, the second captures
        fn()
    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return begin.elapsed_time(end) / n


def host_ms(fn, n: int = 20) -> float:
    """Host milliseconds spent inside one call of ``fn`` started on an idle GPU (e.g. a graph launch)."""
    total = 0.0
    for _ in range(n):
        torch.cuda.synchronize()
        begin = time.perf_counter()
        fn()
        total += time.perf_counter() - begin
    torch.cuda.synchronize()
    return 1e3 * total / n


def overlap_with_prefill(engine: Engine, tick, rows: torch.Tensor, loops: int,
                         n_ticks: int = 40) -> dict:
    """Could prefills hide behind ticks? Replays n_ticks depth ticks (high-priority stream) and one
    prefill of max_batch prompts of 128 tokens (another stream, its own graph pool), first one
    after the other, then concurrently. The prefill writes the running rows' cache: the numbers
    are timings only."""
    tick_stream = torch.cuda.Stream(priority=-1)
    side = torch.cuda.Stream()
    prefill_graphs = StageGraphs()
    ids = torch.randint(0, engine.cfg.vocab_size, (rows.numel(), 128), device="cuda")
    last = torch.full((rows.numel(),), 127, device="cuda")
    prefill = lambda: prefill_graphs(("prefill",), functools.partial(engine.stages.prefill, n_loops=loops),  # noqa: E731
                                     rows, ids, last)
    ticks = lambda: [engine.run_stage(tick, ("profile_depth_tick", rows.numel()), rows)  # noqa: E731
                     for _ in range(n_ticks)]
    for _ in range(2):
        prefill()
    torch.cuda.synchronize()

    def elapsed(fn, stream) -> tuple[torch.cuda.Event, torch.cuda.Event]:
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            begin.record()
            fn()
            end.record()
        return begin, end

    out = {}
    for name, fn, stream in (("ticks_alone", ticks, tick_stream), ("prefill_alone", prefill, side)):
        b, e = elapsed(fn, stream)
        torch.cuda.synchronize()
        out[name + "_ms"] = b.elapsed_time(e)
    pb, pe = elapsed(prefill, side)
    tb, te = elapsed(ticks, tick_stream)
    torch.cuda.synchronize()
    out["concurrent_ticks_ms"] = tb.elapsed_time(te)
    out["concurrent_prefill_ms"] = pb.elapsed_time(pe)
    out["concurrent_both_ms"] = max(pb.elapsed_time(pe), pb.elapsed_time(te))
    out["serial_both_ms"] = out["ticks_alone_ms"] + out["prefill_alone_ms"]
    return {"overlap": out}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--loops", type=int, default=32)
    p.add_argument("--sync-every", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    model = spec_model("gqa", "cuda")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, model.cfg.vocab_size, (64,), generator=g).tolist() for _ in range(4 * args.max_batch)]
    spread_halting(model, torch.tensor([prompts[0]], device="cuda"), 2.0, 1.0)
    engine = Engine(model, max_batch=args.max_batch, max_len=256, max_loop_budget=args.loops, compile=True,
                    sync_every=args.sync_every)
    engine.warmup(args.loops)
    for pr in prompts:
        engine.submit(Request(pr, 128, args.loops, SamplingParams(temperature=0), ExitRule("act")))
    for _ in range(20):  # admission of the first max_batch requests, then steady ticks
        engine.tick()
    assert len(engine.active) == args.max_batch
    report = {"max_batch": args.max_batch, "loop_budget": args.loops, "sync_every": args.sync_every}
    torch.cuda.synchronize()
    report["tick_wall"] = gpu_ms(engine.step)
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(10):
            engine.tick()
        torch.cuda.synchronize()
    tables = [prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=60)
              for key in ("cpu_time_total", "cuda_time_total")]

    rows = engine.rows(engine.running())
    done = torch.ones_like(rows, dtype=torch.bool)

    def loops4(r):
        for _ in range(4):
            engine.stages.loop(r)

    tick = functools.partial(engine.stages.depth_tick, probe=False, start=True, finish=True, loops=1)
    stages = {"depth_tick": (tick, (rows,)), "start": (engine.stages.start, (rows,)),
              "loop": (engine.stages.loop, (rows,)), "loop_x4": (loops4, (rows,)),
              "finish": (engine.stages.finish, (rows, done))}
    with torch.inference_mode():
        for name, (stage, inputs) in stages.items():
            replay = lambda: engine.run_stage(stage, ("profile_" + name, rows.numel()), *inputs)  # noqa: E731
            report[name + "_gpu"] = gpu_ms(replay)
            report[name + "_launch_host"] = host_ms(replay)
        report |= overlap_with_prefill(engine, tick, rows, args.loops)
    print(json.dumps(report, indent=1), flush=True)
    if args.out:
        with open(args.out + "/profile_depth.json", "w") as f:
            json.dump(report, f, indent=1)
        with open(args.out + "/profile_depth_tables.txt", "w") as f:
            f.write("\n\n".join(tables))


if __name__ == "__main__":
    main()

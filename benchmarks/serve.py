"""Load test of `mythos serve`: the real server on 127.0.0.1, N streaming clients at a time.

    python benchmarks/serve.py [--spec] [--concurrency 1 8 32 64] [--out benchmarks/results/h100]

Without --spec: the random tiny demo model (CPU-sized); with --spec: the SPEC config in bf16 (GPU).
For each concurrency c, 2c requests (prompt 64 bytes-tokens, --max-tokens new tokens, greedy,
n_loops 8 or the model's max) are sent by c concurrent streaming clients; reported: requests/s,
generated tokens/s, mean time to first token. Before the server listens, ``Engine.warmup`` runs (and
captures) every batch and prompt-length bucket, as ``mythos serve`` does; ``--untimed-round`` also
runs each concurrency's load once before timing it. Baseline in the same run: concurrency 1 (one request at a
time, i.e. no
batching). ``--schedule depth token`` measures several engine schedules, one server each
(``--sync-every``, ``--prefill-batch``: the engine's options, as ``mythos serve`` takes them).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import httpx
import torch

from common import env_info, write_report

from open_mythos import OpenMythos
from open_mythos.cli import demo_config
from open_mythos.inference import Engine
from open_mythos.serving import build_app, serve_in_thread
from open_mythos.tokenizer import ByteTokenizer


async def one(client: httpx.AsyncClient, url: str, body: dict) -> tuple[float, int]:
    t0, first, tokens = time.perf_counter(), None, 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
        async for line in resp.aiter_lines():
            if line.startswith("data: {"):
                first = first or time.perf_counter() - t0
            if '"loop_depths"' in line:
                tokens = line.count(",", line.index('"loop_depths"')) + 1
    return first or 0.0, tokens


async def load(url: str, concurrency: int, n_requests: int, body: dict) -> dict:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600) as client:
        async def task(i):
            async with sem:
                return await one(client, url, body | {"prompt": f"{i:04d} " + "x" * 59})
        t0 = time.perf_counter()
        results = await asyncio.gather(*(task(i) for i in range(n_requests)))
        seconds = time.perf_counter() - t0
    tokens = sum(r[1] for r in results)
    return {"requests_per_s": n_requests / seconds, "tokens_per_s": tokens / seconds,
            "mean_ttft_s": statistics.mean(r[0] for r in results), "requests": n_requests, "tokens": tokens}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--spec", action="store_true")
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32, 64])
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--schedule", nargs="+", default=["depth"], choices=["depth", "token", "static"],
                   help="engine schedules to measure, each with its own server, in the same run")
    p.add_argument("--sync-every", type=int, default=1, help="depth schedule: loop iterations per tick")
    p.add_argument("--prefill-batch", type=int, default=1,
                   help="depth/continuous schedules: prefill this many requests at once")
    p.add_argument("--untimed-round", action="store_true",
                   help="after the engine's warm-up, also run each concurrency's load once untimed")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    if args.spec:
        from decode import spec_model

        model = spec_model("gqa", device)
    else:
        model = OpenMythos(demo_config()).to(device).eval()
    loops = min(8, model.cfg.max_loop_iters)
    body = {"max_tokens": args.max_tokens, "temperature": 0, "stream": True, "n_loops": loops}
    results = {}
    for schedule in args.schedule:
        engine = Engine(model, max_batch=args.max_batch, max_len=256, compile=args.compile, schedule=schedule,
                        sync_every=args.sync_every if schedule == "depth" else 1,
                        prefill_batch=args.prefill_batch if schedule != "static" else 1)
        t0 = time.perf_counter()
        shapes = engine.warmup(loops)  # what `mythos serve` does before it listens
        warmup_s = time.perf_counter() - t0
        print(schedule, f"warm-up: {shapes} shapes in {warmup_s:.1f} s", flush=True)
        server, url = serve_in_thread(build_app(engine, ByteTokenizer(), "bench", max_pending=1024))
        if args.untimed_round:
            for c in args.concurrency:
                asyncio.run(load(url, c, 2 * c, body))
        rows = results[schedule] = {"warmup_s": warmup_s}
        for c in args.concurrency:
            rows[f"concurrency_{c}"] = asyncio.run(load(url, c, 2 * c, body))
            print(schedule, c, rows[f"concurrency_{c}"], flush=True)
        base = rows[f"concurrency_{args.concurrency[0]}"]["tokens_per_s"]
        for name, r in rows.items():
            if name.startswith("concurrency_"):
                r["tokens_per_s_vs_first"] = r["tokens_per_s"] / base
        server.should_exit = True
    write_report("serve" + ("_spec" if args.spec else "_demo"), {
        "benchmark": "serve", "env": env_info(), "model": "SPEC gqa bf16" if args.spec else "demo (random, tiny)",
        "max_batch": args.max_batch, "max_tokens": args.max_tokens, "n_loops": loops, "compiled_stages": args.compile,
        "sync_every_depth": args.sync_every, "prefill_batch": args.prefill_batch,
        "results": results}, args.out)


if __name__ == "__main__":
    main()

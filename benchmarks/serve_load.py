"""Bounded load test of `mythos serve` on 127.0.0.1: many requests at once, some disconnecting.

    python benchmarks/serve_load.py [--requests 200] [--disconnect 50] [--out benchmarks/results/cpu/serve-load]

All requests are sent at once (half streaming, half not; completions and chat; greedy and seeded
sampling, loop budgets 1..4, exit rules, stop strings); ``--disconnect`` of them hang up early (a
stream after its first chunk, a plain request after 1 s). Checked, and reported as
JSON: every request answered (2xx) or disconnected, none failed; afterwards no slot is held and
nothing waits (/metrics ``running`` and ``queue_depth`` 0), /metrics counted every request and at
least every completed token; and every completed output (text and finish reason) equals the same
request run alone on a fresh engine (batch 1). The model is the random demo model on the host's
device; the exit code is 1 if a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import sys
import time

import httpx
import torch

from common import env_info, write_report

from open_mythos import OpenMythos
from open_mythos.cli import demo_config
from open_mythos.inference import Engine, ExitRule, Request
from open_mythos.inference.text import TextStream
from open_mythos.sampling import SamplingParams
from open_mythos.serving import build_app, serve_in_thread
from open_mythos.tokenizer import ByteTokenizer

WORDS = ["To be", "or not", "the king", "Hello", "sweet", "night", "é", "日本", "  ", "\n"]


def make_bodies(n: int, seed: int = 0, max_loops: int = 4) -> list[tuple[bool, dict]]:
    """(chat, body) of n varied requests (loop budgets 1..max_loops)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        text = f"{i:03d} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6)))
        body = {"max_tokens": rng.randint(2, 12), "n_loops": rng.randint(1, max_loops), "stream": i % 2 == 0,
                "temperature": 0 if rng.random() < 0.5 else 0.9, "seed": i, "top_k": rng.choice([0, 20])}
        if rng.random() < 0.3:
            body["exit_rule"] = {"kind": rng.choice(["act", "kl", "rel_change"]), "threshold": 0.5 if i % 3 else 1e-3}
        if rng.random() < 0.3:
            body["stop"] = [rng.choice(["e", "a", " t", "\n", "é"])]
        chat = i % 3 == 0
        body |= {"messages": [{"role": "user", "content": text}]} if chat else {"prompt": text}
        out.append((chat, body))
    return out


def alone(model, tokenizer, chat: bool, body: dict) -> tuple[str, str]:
    """(text, finish_reason) of ``body`` run alone on a fresh batch-1 engine, as the server defines
    them: the text stops before the first stop string (reason "stop"), end-of-sequence tokens are
    not text."""
    if chat:
        prompt, eos = tokenizer.apply_chat_template(body["messages"]), tuple(tokenizer.chat_stop_token_ids)
    else:
        prompt, eos = tokenizer.encode(body["prompt"]), (tokenizer.eos_token_id,)
    rule = ExitRule(**body["exit_rule"]) if "exit_rule" in body else ExitRule()
    sampling = SamplingParams(body["temperature"], body["top_k"])
    request = Request(prompt, body["max_tokens"], body["n_loops"], sampling, rule, eos, body["seed"])
    out = Engine(model, max_batch=1).run([request])[0]
    stream, text = TextStream(tokenizer, body.get("stop", [])), ""
    for token in out.tokens:
        if token not in eos:
            text += stream.push(token)
        if stream.stopped:
            return text, "stop"
    return text + stream.flush(), out.finish_reason


async def one(client: httpx.AsyncClient, url: str, chat: bool, body: dict, disconnect: bool) -> dict:
    path = f"{url}/v1/{'chat/' if chat else ''}completions"
    if body["stream"]:
        text, reason = "", None
        async with client.stream("POST", path, json=body) as resp:
            if resp.status_code != 200:
                return {"status": resp.status_code}
            async for line in resp.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                if disconnect:
                    return {"status": "disconnected"}  # leaving the block closes the connection
                choice = json.loads(line[6:])["choices"][0]
                text += (choice["delta"].get("content") or "") if chat else choice["text"]
                reason = choice["finish_reason"] or reason
        return {"status": 200, "text": text, "finish_reason": reason}
    try:
        resp = await asyncio.wait_for(client.post(path, json=body), 1.0 if disconnect else None)
    except asyncio.TimeoutError:
        return {"status": "disconnected"}
    if resp.status_code != 200:
        return {"status": resp.status_code}
    choice = resp.json()["choices"][0]
    return {"status": 200, "text": choice["message"]["content"] if chat else choice["text"],
            "finish_reason": choice["finish_reason"]}


def metrics(url: str) -> dict:
    text = httpx.get(f"{url}/metrics").text
    return {ln.split()[0]: float(ln.split()[1]) for ln in text.splitlines() if ln and not ln.startswith("#")}


def run_load(model, tokenizer, n_requests: int, n_disconnect: int, max_batch: int = 8, seed: int = 0) -> dict:
    """Serve ``model``, send the load, check it; the report's ``checks`` are all True on success."""
    bodies = make_bodies(n_requests, seed, min(4, model.cfg.max_loop_iters))
    disconnect = set(random.Random(seed + 1).sample(range(n_requests), n_disconnect))
    engine = Engine(model, max_batch=max_batch)
    server, url = serve_in_thread(build_app(engine, tokenizer, "load", max_pending=n_requests + 1))
    try:
        before = metrics(url)

        async def send():  # no per-request timeout (a request may wait long for a slot); 1 h for all
            async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=None)) as client:
                return await asyncio.wait_for(asyncio.gather(*(one(client, url, chat, body, i in disconnect)
                                                               for i, (chat, body) in enumerate(bodies))), 3600)

        t0 = time.perf_counter()
        results = asyncio.run(send())
        seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        while (m := metrics(url))["mythos_running"] > 0 or m["mythos_queue_depth"] > 0:
            if time.perf_counter() - t1 > 60:
                break
            time.sleep(0.05)
        freed_s = time.perf_counter() - t1
        health = httpx.get(f"{url}/health").status_code
    finally:
        server.should_exit = True
        server.thread.join(60)
    completed = [i for i, r in enumerate(results) if r["status"] == 200]
    mismatches = [i for i in completed
                  if (results[i]["text"], results[i]["finish_reason"]) != alone(model, tokenizer, *bodies[i])]
    delta = {k.replace("mythos_", ""): m[k] - before[k] for k in m if "total" in k}
    reasons = ("stop", "length", "cancelled", "abort", "error")
    ended = {r: delta[f'requests_finished_total{{reason="{r}"}}'] for r in reasons}
    statuses = sorted({str(r["status"]) for r in results})
    n_disconnected = sum(r["status"] == "disconnected" for r in results)
    checks = {
        "every_request_answered_or_disconnected": statuses in (["200"], ["200", "disconnected"]),
        "no_slot_held_and_nothing_waiting": m["mythos_running"] == 0 and m["mythos_queue_depth"] == 0,
        # every accepted request ended (none leaked); a client that left before its request was
        # accepted is not counted, one that left after it ended finished normally
        "metrics_every_accepted_request_ended": delta["requests_total"] == sum(ended.values()),
        "metrics_agree_with_the_clients":
            len(completed) <= ended["stop"] + ended["length"] <= len(completed) + n_disconnected
                                          and ended["cancelled"] <= n_disconnected
                                          and delta["requests_total"] >= n_requests - n_disconnected,
        "metrics_no_failed_or_rejected": ended["error"] + ended["abort"] == 0 and delta["requests_rejected_total"] == 0,
        "completed_outputs_equal_running_alone": not mismatches,
        "health_ok_afterwards": health == 200,
    }
    return {"requests": n_requests, "disconnecting": n_disconnect, "statuses": statuses, "completed": len(completed),
            "disconnected": n_disconnected,
            "streaming": sum(b["stream"] for _, b in bodies), "chat": sum(c for c, _ in bodies),
            "max_batch": max_batch, "seconds": seconds, "requests_per_s": n_requests / seconds,
            "slots_free_after_s": freed_s, "metrics_delta": delta, "mismatched_requests": mismatches,
            "checks": checks}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--disconnect", type=int, default=50)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", choices=["demo", "tiny"], default="demo",
                   help="tiny: the demo model at half width, 8 experts, 3 loops (a busy CPU)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = demo_config()
    if args.model == "tiny":
        cfg = dataclasses.replace(cfg, dim=64, n_experts=8, expert_dim=32, kv_lora_rank=32, q_lora_rank=48,
                                  qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, lora_rank=4, max_loop_iters=3)
    model = OpenMythos(cfg).to(device).eval()
    report = run_load(model, ByteTokenizer(), args.requests, args.disconnect, args.max_batch, args.seed)
    write_report("serve_load", {"benchmark": "serve_load", "env": env_info(), "model": f"{args.model} (random)",
                                "config": dataclasses.asdict(cfg),
                                **report}, args.out)
    sys.exit(0 if all(report["checks"].values()) else 1)


if __name__ == "__main__":
    main()

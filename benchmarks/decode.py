"""Decode throughput, SPEC config (8 loops, bf16): 64 new tokens after a 128-token prompt, greedy,
at batch 1 and 16 -- the prototype's measurement (8.6 / 108 tokens/s on an H100).

    python benchmarks/decode.py [--attn gqa mla] [--batch 1 16] [--out benchmarks/results/h100]

Rows, measured in the same run (tokens/s = new tokens of the batch / wall time incl. prefill):
  naive_no_cache  every new token re-runs the full forward over the whole sequence (no cache)
  generate_eager  OpenMythos.generate: static KVCache, eager
  engine_eager    inference Engine, static schedule, eager stages
  engine_graphs   inference Engine, static schedule, stages replayed from CUDA graphs
  engine_depth    inference Engine, depth schedule, CUDA graphs (no early exit here: same work)
  *_compiled      the same with each engine stage compiled by torch.compile (--compile)
Also: cache memory per token for GQA / MLA x per_loop / shared, and whether the engine's tokens
equal OpenMythos.generate's (bf16: a near-tie can flip an argmax, so the fraction is reported).
"""

from __future__ import annotations

import argparse

import torch

from common import env_info, timed, write_report
from train_step import SPEC

from open_mythos import OpenMythos
from open_mythos.inference import Engine, Request
from open_mythos.sampling import SamplingParams
from open_mythos.training.config import load_config

GREEDY = SamplingParams(temperature=0)


def spec_model(attn: str, device: str) -> OpenMythos:
    cfg = load_config("shakespeare-tiny", overrides=[*SPEC, f"model.attn_type='{attn}'",
                                                     "model.max_output_tokens=512"]).model
    torch.manual_seed(0)
    return OpenMythos(cfg).to(device=device, dtype=torch.bfloat16).eval()


@torch.inference_mode()
def naive_no_cache(model, prompt, new_tokens, n_loops):
    ids = prompt
    for _ in range(new_tokens):
        ids = torch.cat((ids, model(ids, n_loops)[:, -1].argmax(-1, keepdim=True)), dim=1)
    return ids[:, prompt.shape[1]:]


def engine_run(model, prompt, new_tokens, n_loops, schedule, graphs, compile=False, policy="per_loop"):
    engine = Engine(model, max_batch=prompt.shape[0], schedule=schedule, cuda_graphs=graphs, loop_policy=policy,
                    max_len=prompt.shape[1] + new_tokens, compile=compile)
    reqs = [Request(row.tolist(), new_tokens, n_loops, GREEDY) for row in prompt]
    engine.run(reqs)  # warm-up: first calls run eagerly, second capture the graphs
    engine.run(reqs)
    seconds, out = timed(lambda: engine.run(reqs))
    return seconds, torch.tensor([c.tokens for c in out], device=prompt.device), engine


def measure(attn: str, batch: int, args) -> dict:
    model = spec_model(attn, args.device)
    g = torch.Generator().manual_seed(batch)
    prompt = torch.randint(0, model.cfg.vocab_size, (batch, args.prompt), generator=g).to(args.device)
    n, new = args.loops, args.new_tokens
    rows = {}
    # naive: fewer tokens (it is quadratic and slow); its rate is per new token all the same
    naive_new = min(new, args.naive_tokens)
    naive_no_cache(model, prompt, 2, n)
    s, _ = timed(lambda: naive_no_cache(model, prompt, naive_new, n))
    rows["naive_no_cache"] = {"tokens_per_s": batch * naive_new / s, "new_tokens_timed": naive_new}
    print(attn, batch, rows, flush=True)
    model.generate(prompt, 4, n, temperature=0)
    s, ref = timed(lambda: model.generate(prompt, new, n, temperature=0))
    ref = ref[:, args.prompt:]
    rows["generate_eager"] = {"tokens_per_s": batch * new / s}
    variants = [("engine_eager", "static", False, False), ("engine_graphs", "static", True, False),
                ("engine_depth", "depth", True, False)]
    if args.compile:
        variants += [("engine_graphs_compiled", "static", True, True), ("engine_depth_compiled", "depth", True, True)]
    for name, schedule, graphs, compile in variants:
        if name not in args.variants and not name.endswith("compiled"):
            continue
        s, toks, _ = engine_run(model, prompt, new, n, schedule, graphs and args.device == "cuda", compile)
        rows[name] = {"tokens_per_s": batch * new / s, "tokens_equal_generate": (toks == ref).float().mean().item()}
    base = rows["naive_no_cache"]["tokens_per_s"]
    for r in rows.values():
        r["speedup_vs_naive"] = r["tokens_per_s"] / base
    print(attn, batch, rows, flush=True)
    return rows


def cache_memory(args) -> dict:
    out = {}
    for attn in args.attn:
        model = spec_model(attn, args.device)
        for policy in ("per_loop", "shared"):
            engine = Engine(model, max_batch=1, loop_policy=policy, cuda_graphs=False, max_len=64)
            engine.run([Request([1, 2, 3], 2, args.loops, GREEDY)])
            out[f"{attn}_{policy}"] = {"bytes_per_token": engine.cache.bytes_per_token()}
        del model
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--attn", nargs="+", default=["gqa", "mla"])
    p.add_argument("--batch", nargs="+", type=int, default=[1, 16])
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--naive-tokens", type=int, default=16)
    p.add_argument("--loops", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--variants", nargs="+", default=["engine_eager", "engine_graphs", "engine_depth"])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    results = {attn: {f"batch_{b}": measure(attn, b, args) for b in args.batch} for attn in args.attn}
    write_report("decode", {"benchmark": "decode", "env": env_info(), "prompt": args.prompt,
                            "new_tokens": args.new_tokens, "n_loops": args.loops, "dtype": "bf16",
                            "results": results, "cache_memory": cache_memory(args)}, args.out)


if __name__ == "__main__":
    main()

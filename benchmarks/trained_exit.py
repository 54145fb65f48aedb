"""Per-token exit on a trained model: held-out loss, exit depths, and depth batching vs static, in one run.

    python benchmarks/trained_exit.py --run runs/shakespeare-100m [--train-exit-steps 200] [--budget 16] \
        [--out benchmarks/results/h200/trained-exit]

``--run``: a training run's directory (``model/`` and ``train_config.json``: the held-out split and the
training batches are rebuilt from its data settings). With ``--train-exit-steps N`` the halting unit is
first trained on the frozen model (training/exit.py, the same phase as ``mythos train --set exit.steps=N``),
and the unit as loaded is measured beside it.

1. Held-out loss, teacher-forced through the engine's decode stages (eval/early_exit.py): ``--eval-rows``
   windows of ``--eval-len`` tokens from the held-out split, the first ``--prompt-len`` prefilled at the
   budget, every later token scored with exit rule none (full depth ``--budget``; and the training mean
   depth), ``act`` at each of ``--act-thresholds`` (trained unit, and the unit as loaded), and ``kl``.
   The ``act`` threshold used below is the one with the fewest mean loops whose loss stays within
   ``--tolerance`` (relative) of full depth (the model's act_threshold if none does).
2. Throughput: ``--requests`` greedy requests whose prompts are held-out windows of ``--prompt-tokens``,
   ``--new-tokens`` each, loop budget ``--budget``, ``--max-batch`` rows, for the chosen ``act`` rule and
   ``kl``: static batching (a batch waits for its slowest row) against the depth schedule for each
   ``--sync-every`` x ``--prefill-batch``. Each engine runs the workload once untimed (compilation, CUDA-graph
   capture) and once timed (``depth_batching.run_measured``).

Prints JSON (written to ``--out/trained_exit.json``) and plots the exit-depth histograms
(``--out/exit_depths.png``). Report key ``depth_batching_speedup_trained``: the best depth variant's
whole-run tokens/s over static's, per rule.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import time
from pathlib import Path

import torch

from common import env_info, write_report
from depth_batching import run_measured

from open_mythos.eval.early_exit import exit_loss
from open_mythos.inference import Engine, ExitRule, Request
from open_mythos.model import OpenMythos
from open_mythos.sampling import SamplingParams
from open_mythos.tokenizer import load_tokenizer
from open_mythos.training.config import config_from_dict
from open_mythos.training.data import PackedLoader, split_tokens
from open_mythos.training.exit import ExitConfig, exit_report, train_exit


def windows(tokens: torch.Tensor, n: int, length: int) -> torch.Tensor:
    """``n`` windows (n, length) spread evenly over a token stream."""
    if tokens.numel() < n * length:
        raise ValueError(f"the held-out split has {tokens.numel()} tokens, fewer than {n} x {length}")
    starts = torch.linspace(0, tokens.numel() - length, n).long()
    return torch.stack([tokens[s: s + length] for s in starts.tolist()])


def measure_rules(model, ids, prompt_len, budget, rules: dict[str, ExitRule], train_loops: int) -> dict:
    out = {}
    for name, rule in rules.items():
        t0 = time.perf_counter()
        out[name] = exit_loss(model, ids, prompt_len, budget, rule) | {"seconds": time.perf_counter() - t0}
        print(f"{name}: loss {out[name]['loss']:.4f}, mean loops {out[name]['mean_loops']:.2f}", flush=True)
    out[f"none_{train_loops}_loops"] = exit_loss(model, ids, prompt_len, train_loops, ExitRule("none"))
    return out


def throughput(model, prompts, args, rule: ExitRule) -> dict:
    reqs = [Request(p, args.new_tokens, args.budget, SamplingParams(temperature=0), rule) for p in prompts]
    runs = {}
    variants = [("static", 1, 1)] + [("depth", k, b) for b in args.prefill_batch for k in args.sync_every]
    for schedule, sync_every, prefill_batch in variants:
        name = schedule if schedule == "static" else f"depth_sync_every_{sync_every}_prefill_batch_{prefill_batch}"
        engine = Engine(model, max_batch=args.max_batch, schedule=schedule,
                        max_len=args.prompt_tokens + args.new_tokens, max_loop_budget=args.budget,
                        compile=args.compile, sync_every=sync_every, prefill_batch=prefill_batch)
        t0 = time.perf_counter()
        engine.run(reqs)  # untimed: compiles and captures every shape this workload meets
        warm = time.perf_counter() - t0
        engine.stats = dict.fromkeys(engine.stats, 0)
        engine.depth_histogram.clear()
        result, outputs = run_measured(engine, reqs)
        depths = collections.Counter(d for _, ds in outputs for d in ds[1:])  # the first token: prefill depth
        n = sum(depths.values())
        runs[name] = result | {"warmup_seconds": warm, "loop_row_evaluations": engine.stats["loop_rows"],
                               "ticks": engine.stats["ticks"],
                               "mean_exit_depth": sum(d * c for d, c in depths.items()) / n,
                               "exit_depth_histogram": dict(sorted(depths.items()))}
        print(rule, name, {k: v for k, v in runs[name].items() if k != "exit_depth_histogram"}, flush=True)
    static = runs["static"]
    for r in runs.values():
        r["speedup_vs_static"] = r["tokens_per_s"] / static["tokens_per_s"]
        r["sustained_speedup_vs_static"] = r["sustained_tokens_per_s"] / static["sustained_tokens_per_s"]
    return runs


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rules = {k: v for k, v in report["held_out"].items() if "histogram" in v and not k.startswith("none")}
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(len(rules), 1)
    for i, (name, r) in enumerate(rules.items()):
        hist = {int(d): n for d, n in r["histogram"].items()}  # (a report read back from JSON has str keys)
        total = sum(hist.values())
        ds = sorted(hist)
        ax.bar([d + (i - len(rules) / 2 + 0.5) * width for d in ds], [hist[d] / total for d in ds],
               width, label=f"{name} (mean {r['mean_loops']:.2f}, loss {r['loss']:.4f})")
    ax.set_xlabel("exit depth (loops run)")
    ax.set_ylabel("fraction of held-out tokens")
    full = report["held_out"]["none"]["loss"]
    ax.set_title(f"per-token exit, budget {report['budget']} (full depth: loss {full:.4f})")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="a training run directory (model/, train_config.json)")
    p.add_argument("--train-exit-steps", type=int, default=0, help="train the halting unit first (0: as loaded)")
    p.add_argument("--exit-margin", type=float, default=ExitConfig.margin)
    p.add_argument("--exit-lr", type=float, default=ExitConfig.lr)
    p.add_argument("--exit-batch-size", type=int, default=0, help="sequences per exit step (0: the run's micro-batch)")
    p.add_argument("--budget", type=int, default=16, help="loop budget per token (and the exit labels' depth)")
    p.add_argument("--act-thresholds", type=float, nargs="+", default=[0.5, 0.9, 0.99])
    p.add_argument("--kl", type=float, default=5e-4, help="the kl rule's threshold (nats)")
    p.add_argument("--tolerance", type=float, default=0.01, help="relative loss increase allowed for the act choice")
    p.add_argument("--eval-rows", type=int, default=32)
    p.add_argument("--eval-len", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=32, help="held-out loss: tokens prefilled before scoring")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--sync-every", nargs="+", type=int, default=[1])
    p.add_argument("--prefill-batch", nargs="+", type=int, default=[1])
    p.add_argument("--compile", action="store_true", help="compile the engine's stages")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16" if torch.cuda.is_available() else "fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--save-model", help="write the model with the trained halting unit here")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    run = Path(args.run)
    cfg = config_from_dict(json.loads((run / "train_config.json").read_text()))
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    train_tokens, val_tokens = split_tokens(cfg.data, tokenizer)
    model = OpenMythos.from_pretrained(run / "model", device=args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    autocast = ((lambda: torch.autocast(args.device, dtype=dtype)) if dtype != torch.float32
                else contextlib.nullcontext)  # exit training: fp32 master weights, compute in ``dtype``
    ids = windows(val_tokens, args.eval_rows, args.eval_len)
    act_rules = {f"act_{t:g}": ExitRule("act", t) for t in args.act_thresholds}
    report = {"benchmark": "trained_exit", "env": env_info(), "run": str(run), "budget": args.budget,
              "train_mean_loops": cfg.loops.mean, "dtype": args.dtype,
              "held_out_windows": {"rows": args.eval_rows, "length": args.eval_len, "prompt_len": args.prompt_len}}
    if args.train_exit_steps:
        loaded = model.to(dtype).eval()
        report["held_out_unit_as_loaded"] = measure_rules(loaded, ids.to(args.device), args.prompt_len, args.budget,
                                                          act_rules, cfg.loops.mean)
        model = OpenMythos.from_pretrained(run / "model", device=args.device)  # fp32 master weights to train
        exit_cfg = ExitConfig(steps=args.train_exit_steps, margin=args.exit_margin, lr=args.exit_lr)
        loader = PackedLoader(train_tokens, cfg.data.seq_len, args.exit_batch_size or cfg.batch_size // cfg.grad_accum,
                              cfg.seed + 1)
        batches = ((x.to(args.device), y.to(args.device)) for x, y in iter(loader.next_batch, None))
        t0 = time.perf_counter()
        history = train_exit(model, batches, exit_cfg, args.budget, autocast)
        val = windows(val_tokens, 8, cfg.data.seq_len + 1)
        report["exit_training"] = {"steps": exit_cfg.steps, "margin": exit_cfg.margin, "lr": exit_cfg.lr,
                                   "batch": loader.global_batch, "seq_len": cfg.data.seq_len,
                                   "seconds": time.perf_counter() - t0, "objective_first": history[0],
                                   "objective_last": history[-1],
                                   "held_out_parallel": exit_report(model, [(val[:, :-1], val[:, 1:])], args.budget,
                                                                    exit_cfg.margin, model.act_threshold, autocast)}
        if args.save_model:
            model.save_pretrained(args.save_model)
    model = model.to(dtype).eval()
    held = measure_rules(model, ids.to(args.device), args.prompt_len, args.budget,
                         {"none": ExitRule("none"), **act_rules, f"kl_{args.kl:g}": ExitRule("kl", args.kl)},
                         cfg.loops.mean)
    full = held["none"]["loss"]
    for r in held.values():
        r["loss_vs_full_depth"] = r["loss"] / full - 1
    within = [k for k in act_rules if held[k]["loss_vs_full_depth"] <= args.tolerance]
    chosen = min(within, key=lambda k: held[k]["mean_loops"]) if within else None
    act = act_rules[chosen] if chosen else ExitRule("act")
    report |= {"held_out": held, "act_choice": {"rule": chosen or "act (model act_threshold)",
                                                "tolerance": args.tolerance, "within_tolerance": chosen is not None}}
    prompts = windows(val_tokens, args.requests, args.prompt_tokens).tolist()
    report["throughput_setup"] = {"requests": args.requests, "max_batch": args.max_batch,
                                  "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                                  "compiled_stages": args.compile}
    report["throughput"] = {}
    for name, rule in ((chosen or "act", act), (f"kl_{args.kl:g}", ExitRule("kl", args.kl))):
        report["throughput"][name] = throughput(model, prompts, args, rule)
    report["depth_batching_speedup_trained"] = {
        name: max(r["speedup_vs_static"] for k, r in runs.items() if k != "static")
        for name, runs in report["throughput"].items()}
    write_report("trained_exit", report, args.out)
    if args.out:
        plot(report, Path(args.out) / "exit_depths.png")


if __name__ == "__main__":
    main()

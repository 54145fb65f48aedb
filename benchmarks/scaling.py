"""Multi-GPU scaling of training (issue 29): DDP and FSDP2 under torchrun against one GPU's fastest path.

    # one GPU (the fastest path: the whole step as CUDA graphs)
    python benchmarks/scaling.py --out one.json --data DIR  shk_b32@shk@batch_size=32@steps=60
    # two GPUs (variants run one after another in one process group)
    torchrun --nproc_per_node=2 benchmarks/scaling.py --out two.json --data DIR \
        shk_ddp_b64@shk@batch_size=64@steps=100@ckpt_every=50  shk_fsdp_b64@shk@batch_size=64@parallel='fsdp'
    # a checkpoint of another run, resumed here (another world size: DCP reshards it)
    ... shk_resume@shk@batch_size=64@steps=100@resume_from=RUN_DIR:50
    # the report: ratios to one GPU's fastest path, loss-curve differences
    python benchmarks/scaling.py --summarize one.json two.json ... --out summary.json

A variant is ``name@model@override@...``: ``model`` is ``shk`` (the shakespeare-100m preset, one loop count:
``loops.schedule='fixed'``, so one captured forward graph) or ``spec`` (the SPEC config of
benchmarks/train_step.py); overrides are `mythos train --set` ones. Each variant is the real
``Trainer(cfg).train()``: the steps, then the end-of-run checkpoint, export, loop sweep and sample. Recorded per
variant: tokens/s (global and per GPU: median of steps >= 5, after compilation and capture), MFU per GPU, every
step's loss and grad norm, every rank's own throughput line, the seconds of the steps and of the rest of the run.
A variant that fails with the step graph is re-run without it (``NAME_eager``), so one failure costs one number
(the bucketed all-reduce inside the graph ran on 2 H200s in the first round; its ``NAME_flat`` retry is gone).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from common import env_info
from train_step import SPEC

from open_mythos.training.config import load_config
from open_mythos.training.loop import Trainer

WARM_STEPS = 5  # step 0 compiles (uncaptured), step 1 captures; medians start after these
SHK = ["loops.schedule='fixed'", "eval_every=0", "eval_batches=4", "sweep_loops=[4]", "sample_tokens=0", "log_every=1"]
SPEC_RUN = [*SPEC, "compile=true", "step_graph=true", "log_every=1", "sweep_loops=[8]", "eval_every=0",
            "sample_tokens=0"]  # (its 32000-entry vocabulary samples ids the byte tokenizer cannot decode)


def parse_variant(text: str, data: str, root: Path) -> tuple[str, list[str], str | None]:
    name, model, *overrides = text.split("@")
    resume = next((o.split("=", 1)[1] for o in overrides if o.startswith("resume_from=")), None)
    overrides = [o for o in overrides if not o.startswith("resume_from=")]
    if model == "shk":
        base = ["shakespeare-100m", *SHK, f"data.path='{data}'"]
    elif model == "spec":
        base = ["shakespeare-tiny", *SPEC_RUN]
    else:
        raise ValueError(f"unknown model {model!r} in variant {text!r}: use shk or spec")
    return name, [*base, *overrides, f"out_dir='{root / name}'"], resume


def rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def run_variant(name: str, preset_and_overrides: list[str], resume: str | None) -> dict:
    preset, *overrides = preset_and_overrides
    cfg = load_config(preset, overrides=overrides)
    run_dir = Path(cfg.out_dir)
    if rank0():
        shutil.rmtree(run_dir, ignore_errors=True)
        if resume:  # RUN_DIR:STEP -> that run's checkpoint, copied into this run's directory
            src, step = resume.rsplit(":", 1)
            ckpt = f"step_{int(step):08d}"
            shutil.copytree(Path(src) / "checkpoints" / ckpt, run_dir / "checkpoints" / ckpt)
    if dist.is_initialized():
        dist.barrier()
    torch._dynamo.reset()  # another batch shape: compile afresh (the on-disk inductor cache still serves)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer = Trainer(cfg, resume=resume is not None, progress=False)
    t_built = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    ranks = [None] * trainer.info.world_size
    mine = {**trainer.rank_throughput(), "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
    if dist.is_initialized():
        dist.all_gather_object(ranks, mine)
    else:
        ranks = [mine]
    out = {"name": name, "world_size": trainer.info.world_size, "preset": preset, "overrides": overrides,
           "step_graph": trainer.step_graph, "resumed_from": resume, "wall_s": wall, "build_s": t_built - t0,
           "steps_s": sum(trainer._step_times), "ranks": ranks,
           "other_s": wall - (t_built - t0) - sum(trainer._step_times)}  # checkpoints, export, sweep, sample
    if rank0():
        recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in recs if "loss" in r]
        timed = train[WARM_STEPS:] or train
        out.update({
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
            "tokens_per_s_per_gpu": statistics.median(r["tokens_per_s_per_gpu"] for r in timed),
            "mfu_per_gpu": statistics.median(r["mfu"] for r in timed) if timed[0]["mfu"] is not None else None,
            "graphed_steps": sum(r["graphed"] for r in train),
            "loss": {r["step"]: r["loss"] for r in train}, "grad_norm": {r["step"]: r["grad_norm"] for r in train},
            "val_loss": [r["val_loss"] for r in recs if "val_loss" in r]})
        print(f"{name}: {out['tokens_per_s']:,.0f} tokens/s ({out['tokens_per_s_per_gpu']:,.0f}/GPU), "
              f"wall {wall:.1f} s, steps {out['steps_s']:.1f} s, checkpoints + end of run {out['other_s']:.1f} s",
              flush=True)
    del trainer
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


def run(args) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from open_mythos.training.distributed import init_distributed
        init_distributed()
    root, results = Path(args.runs), {}
    for text in args.variants:
        name, cfg, resume = parse_variant(text, args.data, root)
        attempts = [(name, cfg)]
        if "step_graph=false" not in cfg:  # if the graphed step fails: the eager step
            attempts.append((f"{name}_eager", [*cfg, "step_graph=false"]))
        for attempt, overrides in attempts:
            try:
                results[attempt] = run_variant(attempt, overrides, resume)
                break
            except Exception as e:  # recorded, and the next attempt / variant runs
                results[attempt] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
                print(f"{attempt} FAILED: {e}", flush=True)
        if rank0():
            Path(args.out).write_text(json.dumps({"env": env(), "results": results}, indent=1))


def env() -> dict:
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None
    return {**env_info(), "nccl": nccl, "world_size": dist.get_world_size() if dist.is_initialized() else 1}


def curve_diff(a: dict, b: dict, start: int = 0) -> dict | None:
    """|a - b| of two loss curves ({step: loss}) over the steps both have from ``start``: at the first of them (equal
    weights there: only the forward's rounding), the largest over the next 10 (a wrong gradient or update shows
    here), the largest overall (noise grows with the steps) and how many steps. None if they share no step."""
    steps = sorted((s for s in a if s in b and int(s) >= start), key=int)
    if not steps:
        return None
    d = [abs(a[s] - b[s]) for s in steps]
    return {"from_step": int(steps[0]), "steps": len(d), "first": d[0], "max_next_10": max(d[1:11], default=None),
            "max": max(d)}


# loss-curve pairs: (reference, run). The noise baselines bracket what rounding alone does at one world size: the
# same run twice (non-deterministic kernels only) and the global batch as 2 x 32 micro-batches (the arithmetic of
# 2 GPUs x 32, on one GPU). A 2-GPU curve that differs from 1 GPU no more than those do is noise; a fault (a wrong
# mean, a stale or missing gradient, ranks' weights drifting apart) shows as a larger difference in the first steps.
CURVES = {"ddp_vs_1gpu": ("shk_b64", "shk_ddp_b64"), "fsdp_vs_1gpu": ("shk_b64", "shk_fsdp_b64"),
          "noise_1gpu_same_run_twice": ("shk_b64", "shk_b64_repeat"),
          "noise_1gpu_accum2_vs_one_batch": ("shk_b64", "shk_b64_accum2"),
          "ddp_vs_1gpu_accum2": ("shk_b64_accum2", "shk_ddp_b64"),
          "unsharded_vs_sharded_muon_ddp_b32": ("shk_ddp_b32_noshard", "shk_ddp_b32")}


def summarize(paths: list[str], out: str) -> None:
    res = {k: v for p in paths for k, v in json.loads(Path(p).read_text())["results"].items() if "error" not in v}
    def get(name: str) -> dict | None:  # a variant, or its retry
        return next((res[n] for n in (name, f"{name}_eager") if n in res), None)

    def ratio(two: dict | None, one: dict | None) -> float | None:
        return two["tokens_per_s"] / one["tokens_per_s"] if one and two else None

    summary = {}
    for model, base, b_weak, b_strong in (("shk", "shk_b32", 64, 32), ("spec", "spec_b8", 16, 8)):
        for par in ("ddp", "fsdp"):
            for kind, batch in (("weak", b_weak), ("strong", b_strong)):  # None: not measured
                summary.setdefault(f"{kind}_scaling_{par}", {})[model] = ratio(get(f"{model}_{par}_b{batch}"),
                                                                               get(base))
    summary["strong_scaling_ddp_unsharded_muon"] = {"shk": ratio(get("shk_ddp_b32_noshard"), get("shk_b32"))}
    summary["tokens_per_s"] = {n: r.get("tokens_per_s") for n, r in res.items()}
    summary["mfu_per_gpu"] = {n: r.get("mfu_per_gpu") for n, r in res.items()}
    summary["median_step_ms_per_rank"] = {n: [round(r["median_step_s"] * 1e3, 2) for r in v["ranks"]]
                                          for n, v in res.items()}
    curves = {name: curve_diff(get(a)["loss"], get(b)["loss"]) for name, (a, b) in CURVES.items() if get(a) and get(b)}
    resumed, source, other = get("shk_resume_1to2"), get("shk_b64"), get("shk_ddp_b64")
    if resumed and source:  # the 1-GPU checkpoint continued on 2 GPUs, against both uninterrupted curves
        start = min(int(s) for s in resumed["loss"])
        curves["resume_1gpu_ckpt_on_2gpu_vs_1gpu"] = curve_diff(source["loss"], resumed["loss"], start)
        if other:
            curves["resume_1gpu_ckpt_on_2gpu_vs_2gpu"] = curve_diff(other["loss"], resumed["loss"], start)
    summary["loss_curves"] = curves
    Path(out).write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "mfu_per_gpu"}, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variants", nargs="*", help="name@model@override@... (see above)")
    p.add_argument("--out", required=True, help="JSON report (rewritten after every variant)")
    p.add_argument("--data", default="../shared/data/shakespeare", help="shakespeare text directory (shk)")
    p.add_argument("--runs", default="/tmp/scaling_runs", help="run directories")
    p.add_argument("--summarize", nargs="+", metavar="REPORT", help="combine reports into the scaling summary")
    args = p.parse_args()
    if args.summarize:
        summarize(args.summarize, args.out)
    else:
        run(args)


if __name__ == "__main__":
    main()

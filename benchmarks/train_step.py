"""Full training step (forward + backward + Muon/AdamW step + router-bias update) through the real
`Trainer`, SPEC config, bf16 autocast with fp32 master weights, 8 loops, batch 8 x 1024.

    python benchmarks/train_step.py [--attn gqa mla] [--out benchmarks/results/h100]
    python benchmarks/train_step.py --plot REPORT.json [REPORT.json ...] --out DIR   # train_step.png

Variants, measured in the same run: naive per-expert-loop MoE (the prototype's dispatch) eager,
our model eager, compiled (torch.compile of each block, the loop iteration once, and the loss), compiled
with activation checkpointing of each loop, compiled with CUDA graphs (compile_mode='reduce-overhead'), compiled
with the whole step as CUDA graphs (step_graph=true: training/graphs.py), and that with the MoE replaced by
its dense bound (`compiled_step_graph_dense_bound`: moe.dense_bound_moe, the routed FLOPs as dense GEMMs with
dispatch free; a ceiling for any MoE kernel work, not a model).
MFU = flops_per_token (open_mythos.flops) * tokens/s / 989 TFLOP/s.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

import torch

from common import env_info, write_report
from moe import dense_bound_moe, naive_moe

from open_mythos.moe import MoE
from open_mythos.training.config import load_config
from open_mythos.training.loop import Trainer

SPEC = ["model.vocab_size=32000", "model.dim=1024", "model.n_heads=16", "model.n_kv_heads=4", "model.max_seq_len=1024",
        "model.max_loop_iters=8", "model.prelude_layers=2", "model.coda_layers=2", "model.n_experts=64",
        "model.n_shared_experts=2", "model.n_experts_per_tok=4", "model.expert_dim=256", "model.lora_rank=16",
        "model.kv_lora_rank=512", "model.q_lora_rank=1536", "model.qk_rope_head_dim=64", "model.qk_nope_head_dim=128",
        "model.v_head_dim=128", "data.seq_len=1024", "batch_size=8", "loops.schedule='fixed'", "loops.mean=8",
        "loops.max_sampled=8", "loops.backprop=0", "precision='bf16'", "eval_batches=1", "steps=1000",
        "optim.muon_impl='batched'"]


def measure(attn: str, variant: str, steps: int) -> dict:
    overrides = [*SPEC, f"model.attn_type='{attn}'", f"out_dir='/tmp/bench_{attn}_{variant}'",
                 f"compile={str(variant.startswith('compiled')).lower()}",
                 f"activation_checkpointing={str(variant.endswith('ckpt')).lower()}",
                 f"compile_mode='{'reduce-overhead' if variant.endswith('cudagraphs') else 'default'}'",
                 f"step_graph={str('step_graph' in variant).lower()}"]
    # dynamo guards a class by identity, not its attributes: without a reset a variant that patches MoE.forward
    # would silently replay the compiled code of the variant before it
    torch._dynamo.reset()
    original = MoE.forward
    if variant == "naive_moe_eager":
        MoE.forward = lambda self, x: naive_moe(self, x)
    elif variant.endswith("dense_bound"):
        MoE.forward = lambda self, x: dense_bound_moe(self, x)
    try:
        torch.cuda.reset_peak_memory_stats()
        trainer = Trainer(load_config("shakespeare-tiny", overrides=overrides), progress=False)
        warm = 3 if variant != "naive_moe_eager" else 1
        recs = [trainer.train_step() for _ in range(warm + steps)][warm:]
    finally:
        MoE.forward = original
    tok_s = statistics.median(r["tokens_per_s"] for r in recs)
    mfu = statistics.median(r["mfu"] for r in recs) if recs[0]["mfu"] is not None else None
    out = {"tokens_per_s": tok_s, "mfu": mfu, "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
           "loss_first_last": [recs[0]["loss"], recs[-1]["loss"]], "steps_timed": steps}
    print(attn, variant, out, flush=True)
    del trainer
    torch.cuda.empty_cache()
    return out


def plot(paths: list[str], out: str) -> None:
    """Tokens/s of every variant in the given reports, one bar group per attention type, target line."""
    from open_mythos.plot import plt

    rows = [(attn, variant, r["tokens_per_s"]) for path in paths
            for attn, variants in json.loads(Path(path).read_text())["results"].items()
            for variant, r in variants.items()]
    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [f"{attn.upper()} {variant}" for attn, variant, _ in rows]
    ax.barh(labels, [t / 1e3 for *_, t in rows], color=["C0" if a == "gqa" else "C1" for a, *_ in rows])
    ax.axvline(300, color="k", ls="--", label="target 300k")
    ax.set_xlabel("training tokens/s (thousands), SPEC config, batch 8 x 1024, 8 loops")
    ax.invert_yaxis()
    ax.legend(loc="lower right")
    fig.tight_layout()
    Path(out).mkdir(parents=True, exist_ok=True)
    fig.savefig(Path(out) / "train_step.png", dpi=120)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--attn", nargs="+", default=["gqa", "mla"])
    p.add_argument("--variants", nargs="+", default=["naive_moe_eager", "eager", "compiled", "compiled_ckpt",
                                                          "compiled_cudagraphs", "compiled_step_graph"])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--out", default=None)
    p.add_argument("--plot", nargs="+", default=None, help="only plot these reports into --out/train_step.png")
    args = p.parse_args()
    if args.plot:
        return plot(args.plot, args.out or ".")
    from open_mythos.flops import flops_per_token
    results = {}
    for attn in args.attn:
        results[attn] = {v: measure(attn, v, args.steps if v != "naive_moe_eager" else 2) for v in args.variants}
        if "naive_moe_eager" in results[attn]:
            base = results[attn]["naive_moe_eager"]["tokens_per_s"]
            for r in results[attn].values():
                r["speedup_vs_naive_moe"] = r["tokens_per_s"] / base
    cfg = load_config("shakespeare-tiny", overrides=SPEC).model
    write_report("train_step", {"benchmark": "train_step", "env": env_info(), "batch": "8 x 1024", "n_loops": 8,
                                "flops_per_token": {a: flops_per_token(dataclasses.replace(cfg, attn_type=a), 1024, 8)
                                                    for a in args.attn},
                                "results": results}, args.out)


if __name__ == "__main__":
    main()

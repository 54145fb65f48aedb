"""Does an RDT learn the one-hop lookup when its block is iterated? A probe for issue 27's anomaly.

Trains the k-hop experiment's RDT (experiments/khop.py) on 1-hop problems only, at a fixed loop count, and
prints one JSON line: the 1-hop exact match at the end and the training loss curve. Every variant sees the
same problems (same seed). Example (the docs/experiments.md probe instance):

    PYTHONPATH=src python3 benchmarks/khop_lookup_probe.py --loops 2 --set model.injection=residual
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from open_mythos import MythosConfig, OpenMythos
from open_mythos.experiments.khop import KHopConfig, KHopTask, accuracy, train, with_overrides


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--loops", type=int, default=2)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--set", action="append", default=[], help="KHopConfig / model.X override (key=value)")
    args = p.parse_args()
    torch.set_num_threads(1)
    base = KHopConfig(task=KHopTask(max_hops=2, statements=6, n_vars=16, queries=6), train_max_hops=1,
                      model={**KHopConfig().model, "dim": 64, "loop_embed_scale": 0.0},
                      loops_mean=args.loops, loops_min=args.loops, warmup_steps=0, steps=args.steps,
                      batch_size=64, lr=3e-3, eval_problems=256, device="cpu", compile=False)
    cfg = with_overrides(base, args.set)
    torch.manual_seed(cfg.seed)
    model = OpenMythos(MythosConfig(vocab_size=cfg.task.vocab_size, max_seq_len=cfg.task.seq_len, **cfg.model))
    t0 = time.perf_counter()
    hist = train(model, cfg, loops=True, log=lambda *_: None)["history"]
    print(json.dumps({"loops": args.loops, "overrides": args.set, "acc_1hop": accuracy(model, cfg, 1, args.loops),
                      "loss": [round(h["loss"], 3) for h in hist], "seconds": round(time.perf_counter() - t0)}))


if __name__ == "__main__":
    main()

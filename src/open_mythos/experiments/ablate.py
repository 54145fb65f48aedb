"""Recurrence-recipe ablation: single changes to a baseline, each trained at equal tokens through the real
`Trainer`, each measured by held-out loss at 1, 2, 4, 8 and 16 loops.

    mythos experiment ablate --preset cpu                       # every row, shakespeare-tiny, minutes
    mythos experiment ablate --preset gpu --set rows=baseline,residual --set "data.path='...'"

A row is a name and the overrides it applies on top of the preset (``ROWS``); ``baseline`` applies none.
Every row uses the same seed, steps, batch and data order, so rows differ only by their change. The
result (``ablation.json``) lists, per row, the overrides, parameter count, training loss at the end and
the loop sweep; each row is also printed as one JSON line as soon as it finishes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from ..training.config import TrainConfig, load_config
from ..training.loop import Trainer

SWEEP = [1, 2, 4, 8, 16]
# (training preset, overrides): small enough that every row of the CPU preset runs in about a minute
PRESETS = {
    "cpu": ("shakespeare-tiny", ["steps=150", "eval_every=0", "eval_batches=8", "sample_tokens=0"]),
    "gpu": ("shakespeare-100m", ["steps=400", "eval_every=0", "eval_batches=16", "sample_tokens=0", "compile=false",
                                 "step_graph=false", "batch_size=32", "data.seq_len=256", "model.dim=256",
                                 "model.n_heads=4", "model.n_kv_heads=2", "model.n_experts=16",
                                 "model.expert_dim=256", "model.lora_rank=8"]),
}

Row = Callable[[TrainConfig], list[str]]
ROWS: dict[str, Row] = {
    "baseline": lambda c: [],
    "one_loop": lambda c: ["loops.schedule='fixed'", "loops.mean=1", "loops.min_sampled=1"],
    "loop_embed_0": lambda c: ["model.loop_embed_scale=0.0"],
    "loop_embed_0.02": lambda c: ["model.loop_embed_scale=0.02"],
    "residual": lambda c: ["model.injection='residual'"],
    "parcae": lambda c: ["model.injection='parcae'"],
    "state_embed": lambda c: ["model.state_init='embed'"],
    "state_random": lambda c: ["model.state_init='random'"],
    "init_loops_1": lambda c: ["model.init_loops=1"],
    "loop_embed_learned": lambda c: ["model.loop_embed='learned'"],
    "no_out_norm": lambda c: ["model.loop_out_norm=false"],
    "sandwich_norm": lambda c: ["model.sandwich_norm=true"],
    "state_norm": lambda c: ["model.state_norm=true"],
    "lora_0": lambda c: ["model.lora_rank=0"],
    "dense_ffn": lambda c: ["model.recurrent_ffn='dense'"],
    "lr_half": lambda c: [f"optim.muon_lr={c.optim.muon_lr / 2}", f"optim.adamw_lr={c.optim.adamw_lr / 2}"],
    "lr_double": lambda c: [f"optim.muon_lr={c.optim.muon_lr * 2}", f"optim.adamw_lr={c.optim.adamw_lr * 2}"],
    "fixed_loops": lambda c: ["loops.schedule='fixed'"],
    "uniform_loops": lambda c: ["loops.schedule='uniform'"],
    "full_backprop": lambda c: ["loops.backprop=0"],
    # combinations (not single changes): the candidate recipe and its parts
    "residual+embed_init": lambda c: ["model.injection='residual'", "model.state_init='embed'"],
    "residual+loop_embed_0": lambda c: ["model.injection='residual'", "model.loop_embed_scale=0.0"],
}


def row_overrides(name: str, base: TrainConfig) -> list[str]:
    """The overrides of row ``name`` (a key of ROWS, or several joined by '+' whose overrides are concatenated)."""
    if name in ROWS:
        return ROWS[name](base)
    parts = name.split("+")
    unknown = [p for p in parts if p not in ROWS]
    if unknown:
        raise ValueError(f"unknown ablation row(s) {unknown}; available: {', '.join(ROWS)}")
    return [o for p in parts for o in ROWS[p](base)]


def run_ablation(preset: str, out_dir: Path, overrides: list[str] = (), rows: list[str] | None = None,
                 progress: bool = False, log=print) -> dict:
    """Train every row (default: all of ROWS) and return {"preset", "sweep_loops", "rows": [...]}."""
    name, base = PRESETS[preset]
    base = [*base, f"sweep_loops={SWEEP}", *overrides]
    base_cfg = load_config(name, overrides=base)
    out_dir = Path(out_dir)
    changes_by_row = {row: row_overrides(row, base_cfg) for row in rows or list(ROWS)}  # every name checked first
    results = []
    for row, changes in changes_by_row.items():
        cfg = load_config(name, overrides=[*base, *changes, f"out_dir='{out_dir / row}'"])
        trainer = Trainer(cfg, progress=progress, overwrite=True)  # the experiment replaces its own earlier run
        summary = trainer.train()
        last = [json.loads(line) for line in (out_dir / row / "metrics.jsonl").read_text().splitlines()]
        train_loss = next(r["loss"] for r in reversed(last) if "loss" in r)
        rec = {"row": row, "overrides": changes, "params": sum(p.numel() for p in trainer.model.parameters()),
               "train_loss": train_loss, "loss": {r["n_loops"]: r["loss"] for r in summary["sweep"]}}
        results.append(rec)
        log(json.dumps(rec))
    result = {"experiment": "ablate", "preset": name, "base_overrides": base, "sweep_loops": SWEEP, "rows": results}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ablation.json").write_text(json.dumps(result, indent=1))
    log(format_table(result))
    return result


def format_table(result: dict) -> str:
    """Markdown table: one row per ablation row, held-out loss per loop count, best loop count in bold."""
    loops = result["sweep_loops"]
    lines = ["| row | " + " | ".join(f"{n} loops" for n in loops) + " |", "|---" * (len(loops) + 1) + "|"]
    for r in result["rows"]:
        losses = [r["loss"].get(n, r["loss"].get(str(n))) for n in loops]
        best = min(losses)
        cells = [f"**{x:.4f}**" if x == best else f"{x:.4f}" for x in losses]
        lines.append(f"| {r['row']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)

"""Held-out loss vs inference loops with and without ``model.state_norm``: the dense-vs-looped GPU preset's looped
model over three seeds (left; the fixed-depth baselines of each seed dashed) and the ablation preset's four rows
over two seeds (right). ``python benchmarks/results/h200/state-norm-text/plot.py`` -> ``state_norm_text.png``;
prints the table of the README as JSON."""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent
PRESET = HERE.parent / "dense-vs-looped-recipe"


def sweep(path: Path) -> dict[int, float]:
    return {int(r["n_loops"]): r["loss"] for r in json.loads(path.read_text())["sweep"]}


fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
table = {"dense_vs_looped_preset": {}, "ablation_preset": {}}
for seed, color in zip(range(3), ("C0", "C1", "C2")):
    off = sweep(PRESET / f"preset_s{seed}" / "looped" / "sweep.json")
    on = sweep(HERE / "run" / f"looped_sn_s{seed}" / "sweep.json")
    runs = json.loads((PRESET / f"preset_s{seed}" / "dense_vs_looped.json").read_text())["runs"]
    param, flop = runs[1]["loss"], runs[2]["loss"]
    table["dense_vs_looped_preset"][f"seed {seed}"] = {"state_norm false": off, "state_norm true": on,
                                                       "parameter-matched": param, "FLOP-matched": flop}
    left.plot(list(off), list(off.values()), "o-", color=color, label=f"seed {seed}, state_norm false")
    left.plot(list(on), list(on.values()), "s--", color=color, label=f"seed {seed}, state_norm true")
    left.axhline(param, color=color, lw=0.6, ls=":")
left.set(xscale="log", xlabel="inference loops (trained: mean 4)", ylabel="held-out loss (nats/byte)",
         title="dense-vs-looped GPU preset (stdlib, 21M)", ylim=(0.87, 0.96))
left.legend(fontsize=7)
for seed, marker in ((0, "o-"), (1, "s--")):
    for name, color in zip(("baseline", "state_norm", "residual", "residual+state_norm"), ("C0", "C1", "C2", "C3")):
        pair = "baseline,state_norm" if name in ("baseline", "state_norm") else "residual,residual_state_norm"
        rows = json.loads((HERE / "run" / f"abl_{pair}_s{seed}" / "ablation.json").read_text())["rows"]
        loss = {int(k): v for k, v in next(r for r in rows if r["row"] == name)["loss"].items()}
        table["ablation_preset"].setdefault(name, {})[f"seed {seed}"] = loss
        right.plot(list(loss), list(loss.values()), marker, color=color, label=f"{name}, seed {seed}")
right.set(xscale="log", xlabel="inference loops (trained: mean 4)", title="ablation GPU preset (Shakespeare, 6.8M)")
right.legend(fontsize=7)
fig.tight_layout()
fig.savefig(HERE / "state_norm_text.png", dpi=120)
print(json.dumps(table, indent=1))

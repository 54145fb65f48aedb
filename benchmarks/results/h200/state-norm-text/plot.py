"""Held-out loss vs inference loops with and without ``model.state_norm``: the dense-vs-looped GPU preset's
looped model with the lti and residual injections, mean of three seeds (left; the fixed-depth baselines' means
grey), and the ablation preset's four rows over two seeds (right).
``python benchmarks/results/h200/state-norm-text/plot.py`` -> ``state_norm_text.png``; prints the data as JSON."""

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
VARIANTS = {"lti (the preset)": lambda s: PRESET / f"preset_s{s}" / "looped" / "sweep.json",
            "lti + state_norm": lambda s: HERE / "run" / f"looped_sn_s{s}" / "sweep.json",
            "residual": lambda s: HERE / "run2" / f"looped_res_s{s}" / "sweep.json",
            "residual + state_norm": lambda s: HERE / "run2" / f"looped_res_sn_s{s}" / "sweep.json"}
for name, path in VARIANTS.items():
    per_seed = [sweep(path(s)) for s in range(3)]
    mean = {n: sum(d[n] for d in per_seed) / 3 for n in per_seed[0]}
    table["dense_vs_looped_preset"][name] = {"per seed": per_seed, "mean": mean}
    left.plot(list(mean), list(mean.values()), "o-", label=name)
for i, (label, ls) in enumerate((("parameter-matched (3 layers)", ":"), ("FLOP-matched (6 layers)", "--")), 1):
    mean = sum(json.loads((PRESET / f"preset_s{s}" / "dense_vs_looped.json").read_text())["runs"][i]["loss"]
               for s in range(3)) / 3
    table["dense_vs_looped_preset"][label] = mean
    left.axhline(mean, color="gray", ls=ls, lw=1, label=label)
left.set(xscale="log", xlabel="inference loops (trained: mean 4)", ylabel="held-out loss (nats/byte)",
         title="dense-vs-looped GPU preset (stdlib, 21M), mean of 3 seeds", ylim=(0.87, 0.96))
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

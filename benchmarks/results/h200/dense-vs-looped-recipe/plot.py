"""Held-out loss vs inference loops for every looped variant of this folder, with the fixed-depth baselines
of the same seed as horizontal lines: `python benchmarks/results/h200/dense-vs-looped-recipe/plot.py`."""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent


def sweep(run: str) -> dict[int, float]:
    path = HERE / run / ("looped/sweep.json" if (HERE / run / "looped").exists() else "sweep.json")
    return {r["n_loops"]: r["loss"] for r in json.loads(path.read_text())["sweep"]}


def baselines(run: str) -> tuple[float, float]:
    runs = json.loads((HERE / run / "dense_vs_looped.json").read_text())["runs"]
    return runs[1]["loss"], runs[2]["loss"]


panels = [("Prelude 2 + loop + Coda 2, seed 0", "dvl_fixed",
           {"fixed 4 loops": "dvl_fixed", "Poisson-log-normal (max 8)": "looped_pln_pc2",
            "progressive (max 8)": "looped_progressive"}),
          ("Prelude 1 + loop + Coda 1, seed 0", "dvl_fixed_pc1",
           {"fixed 4 loops": "dvl_fixed_pc1", "Poisson-log-normal (max 8)": "looped_pln_pc1",
            "Poisson-log-normal (max 16)": "looped_pln_pc1_max16"}),
          ("Prelude 1 + loop + Coda 1, seed 1", "dvl_pc1_s1", {"Poisson-log-normal (max 8)": "dvl_pc1_s1"})]
fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), sharey=True)
for ax, (title, base_run, variants) in zip(axes, panels):
    param, flop = baselines(base_run)
    for label, run in variants.items():
        s = sweep(run)
        ax.plot(list(s), list(s.values()), "o-", label=f"looped, {label}")
    ax.axhline(param, color="tab:red", ls="--", label="parameter-matched (same model, 1 loop)")
    ax.axhline(flop, color="tab:green", ls="--", label="FLOP-matched (4 loops unrolled)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("inference loops (trained: mean 4)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
axes[0].set_ylabel("held-out loss (nats/byte), stdlib source")
axes[0].set_ylim(0.86, 0.96)  # fixed-4 at 1 loop (0.95-1.29) is cut off
fig.tight_layout()
fig.savefig(HERE / "recipe.png", dpi=120)
print(HERE / "recipe.png")

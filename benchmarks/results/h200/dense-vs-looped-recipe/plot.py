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

# the experiment's GPU preset (P = C = 1, loops at most 16) over three seeds: one colour per seed, its two
# fixed-depth baselines as dashed (parameter-matched) and dotted (FLOP-matched) lines of that colour
fig, ax = plt.subplots(figsize=(6.5, 4.5))
for seed, color in zip(range(3), ("tab:blue", "tab:orange", "tab:purple")):
    run = f"preset_s{seed}"
    s = sweep(run)
    param, flop = baselines(run)
    ax.plot(list(s), list(s.values()), "o-", color=color, label=f"looped, seed {seed}")
    ax.axhline(param, color=color, ls="--", lw=1, label=f"parameter-matched, seed {seed}")
    ax.axhline(flop, color=color, ls=":", lw=1, label=f"FLOP-matched, seed {seed}")
ax.set_xscale("log", base=2)
ax.set_xlabel("inference loops (trained: Poisson-log-normal, mean 4, at most 16)")
ax.set_ylabel("held-out loss (nats/byte), stdlib source")
ax.set_ylim(0.86, 0.96)
ax.set_title("dense-vs-looped --preset gpu, three seeds (H200)", fontsize=10)
ax.legend(fontsize=7, ncol=2)
fig.tight_layout()
fig.savefig(HERE / "preset_seeds.png", dpi=120)
print(HERE / "preset_seeds.png")

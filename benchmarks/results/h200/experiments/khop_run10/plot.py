"""Exact match at 10 hops vs inference loops for the six runs of the k-hop GPU preset (run 9: two seeds, run 10:
four), each run's fixed-depth baseline as a dashed line of its colour, guessing in grey:
`python benchmarks/results/h200/experiments/khop_run10/plot.py` -> hop10_by_seed.png."""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent
RUNS = {"run 9, seed 0": HERE.parent / "khop_run9/khop_res16", "run 9, seed 1": HERE.parent / "khop_run9/khop_res16_s1",
        **{f"run 10, seed {s}": HERE / f"khop_s{s}" for s in range(4)}}
fig, ax = plt.subplots(figsize=(7, 4.5))
for (label, run), color in zip(RUNS.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
    r = json.loads((run / "khop.json").read_text())
    i = r["sizes"].index(10)
    loops = [int(n) for n in r["rdt_accuracy"]]
    ax.plot(loops, [r["rdt_accuracy"][str(n)][i] for n in loops], "o-", color=color, label=f"RDT, {label}")
    ax.axhline(r["baseline_accuracy"][i], color=color, ls="--", lw=1)
ax.axhline(r["guess_accuracy"][i], color="grey", ls=":", label="guessing among the values present")
ax.axhline(0.9, color="black", lw=0.8, label="target 0.90")
ax.set_xscale("log", base=2)
ax.set_xlabel("inference loops (trained: progressive loss up to 16 loops, <= 5 hops)")
ax.set_ylabel("exact match at 10 hops")
ax.set_title("k-hop GPU preset, six runs; dashed: each run's fixed-depth model (same parameters)", fontsize=9)
ax.legend(fontsize=7)
fig.tight_layout()
fig.savefig(HERE / "hop10_by_seed.png", dpi=120)
print(HERE / "hop10_by_seed.png")

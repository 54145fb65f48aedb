"""k-hop accuracy at 24 loops by hops, every GPU-preset run of runs 10 and 11: residual state vs ``state_norm``.

    PYTHONPATH=src python3 benchmarks/results/h200/experiments/khop_run11/plot_runs.py

Sources: ../khop_run10/khop_s*/khop.json (residual, 4 seeds), call3/norm_s2/khop.json, and the printed result
lines of the runs whose JSON did not come back (call1_tail/output_tail.txt, call2/norm_s*.log). Writes
by_run.png and by_run.json (the curves drawn) here."""

from __future__ import annotations

import json
import re
from pathlib import Path

from open_mythos.plot import plt

HERE = Path(__file__).parent
ROW = re.compile(r"^  RDT +24 loops: ([\d. ]+)$")


def rows_24(text: str) -> list[list[float]]:
    return [[float(x) for x in m.group(1).split()] for m in map(ROW.match, text.splitlines()) if m]


def main() -> None:
    curves: dict[str, tuple[str, list[float]]] = {}
    for f in sorted((HERE.parent / "khop_run10").glob("khop_s*/khop.json")):
        curves[f"run 10 {f.parent.name[-2:]}"] = ("residual", json.loads(f.read_text())["rdt_accuracy"]["24"])
    tail = (HERE / "call1_tail" / "output_tail.txt").read_text().split("== ")
    for block in tail[1:]:
        name = block.split("/")[-1].split(".log")[0]
        if "st20" in name or not rows_24(block):  # 12-statement runs with a 24-loop row only
            continue
        curves[f"run 11 call 1 {name}"] = ("state_norm" if name.startswith("norm") else "residual", rows_24(block)[0])
    for f in sorted((HERE / "call2").glob("norm_s?.log")):
        curves[f"run 11 call 2 {f.stem}"] = ("state_norm", rows_24(f.read_text())[0])
    curves["run 11 call 3 norm_s2"] = ("state_norm", json.loads((HERE / "call3/norm_s2/khop.json").read_text())
                                       ["rdt_accuracy"]["24"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, (kind, acc) in curves.items():
        ax.plot(range(1, len(acc) + 1), acc, "o-" if kind == "state_norm" else "x--", ms=3,
                color="tab:blue" if kind == "state_norm" else "tab:grey", label=f"{kind}: {name}")
    ax.axvline(5, color="grey", ls="--", lw=1)
    ax.axhline(0.9, color="tab:green", ls=":", lw=1)
    ax.set_xlabel("hops (dashed: largest trained; dotted: the 0.90 target)")
    ax.set_ylabel("exact match at 24 loops")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(HERE / "by_run.png", dpi=120)
    (HERE / "by_run.json").write_text(json.dumps(curves, indent=1))
    for name, (kind, acc) in curves.items():
        print(f"{kind:10s} {name:28s} 10 hops at 24 loops: {acc[-1]:.3f}")


if __name__ == "__main__":
    main()

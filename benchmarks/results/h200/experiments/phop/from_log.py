"""Rebuild phop.json and phop.png of a p-hop run from its log, for runs the device call killed (``timeout``) after
the evaluation printed its tables but before ``mythos experiment p-hop`` wrote its JSON (2026-12-01: seed 0 was
killed during the one-pass model's evaluation, seed 1 during the unrolled model's).

    PYTHONPATH=src python3 benchmarks/results/h200/experiments/phop/from_log.py \
        benchmarks/results/h200/experiments/phop/run_2026-12-01/phop_s1.log --seed 1

Reads the log's result lines ("RDT  n loops: ...", "RDT converged", "RDT state RMS", "baseline"); the settings are
the GPU preset's (with ``--seed``); the guessing baseline is recomputed here (the same problems: it is a function
of the task and the evaluation seed). Missing parts stay missing: keys absent, ``"partial": true``. The report
keys are ``phop.add_report_keys``'s, as in a complete run; the held-out losses of each model's training (the last
``val_loss`` of ``<run>/<model>/metrics.jsonl``) are added."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from open_mythos.experiments import extrapolation, phop

ROW = re.compile(r"^  RDT +(\d+) loops: ([\d. ]+)$")


def numbers(text: str) -> list[float]:
    return [float(x) for x in text.split()]


def val_loss(run: Path) -> float | None:
    if not (run / "metrics.jsonl").exists():
        return None
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "val_loss" in line]
    return rows[-1]["val_loss"] if rows else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log", type=Path)
    ap.add_argument("--seed", type=int, required=True)
    args = ap.parse_args()
    tree, _, ev, task = extrapolation.split_settings(phop.PRESETS["gpu"], [f"seed={args.seed}"])
    sizes, grid, result = list(ev["sizes"]), {}, {"experiment": "phop", "settings": tree, "eval": ev,
                                                  "partial": True, "source": f"parsed from {args.log.name}"}
    for line in args.log.read_text().splitlines():
        if m := ROW.match(line):
            grid[m.group(1)] = numbers(m.group(2))
        elif line.startswith("  RDT converged :"):
            result["rdt_converged_accuracy"] = numbers(line.split(":")[1].split("(")[0])
            result["rdt_converged_loops"] = numbers(line.split("mean loops")[1].rstrip(")"))
            result["stop_patience"] = ev.get("stop_patience", 2)
        elif line.startswith("  RDT state RMS"):
            result["rdt_state_rms_by_loop"] = numbers(line.split(":", 1)[1])
        elif line.startswith("  baseline      :"):
            result["baseline_accuracy"] = numbers(line.split(":")[1])
    loops = [n for n in ev["loops"] if str(n) in grid]
    result.update(sizes=sizes, loops=loops, rdt_accuracy=grid,
                  guess_accuracy=[extrapolation.guess_accuracy(task, s, ev["problems"]) for s in sizes],
                  rdt_best_accuracy=[max(grid[str(n)][i] for n in loops) for i in range(len(sizes))])
    run = args.log.parent / args.log.stem
    result["val_loss"] = {m: val_loss(run / m) for m in ("rdt", "baseline", "unrolled")}
    phop.add_report_keys(result)
    (run / "phop.json").write_text(json.dumps(result, indent=1))
    extrapolation.plot(result, run / "phop.png", "hops p")
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, (dict, list))}))


if __name__ == "__main__":
    main()

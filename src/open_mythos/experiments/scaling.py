"""Loop scaling and dense-vs-looped on real text (Shakespeare), through the real `Trainer`.

``loops``: train one RDT (loop count sampled per step), measure held-out loss at loop counts from 1
to 4x the training mean and fit a saturating exponential

    L(n) = L_inf + A * exp(-(n - 1) / tau)

(for each tau on a log grid, L_inf and A by linear least squares; the tau with the smallest
squared error wins). The claim under test: loss falls with loops up to the training depth and
does not degrade beyond it.

``dense-vs-looped``: the RDT and fixed-depth transformers of increasing depth (the same blocks, one
loop: a plain L-layer stack) trained on the same data for the same steps and tokens; held-out loss
against parameter count. The claim under test: a looped model matches a larger fixed-depth one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..plot import plt
from ..training.config import load_config
from ..training.loop import Trainer

PRESETS = {"cpu": ("shakespeare-tiny", ["steps=150", "eval_every=0"]),
           "gpu": ("shakespeare-100m", ["steps=1000", "eval_every=0"])}
# dense-vs-looped trains 4 models: (prelude, coda) layers of the fixed-depth ones, and fewer steps on
# the GPU so that all four fit one 9-minute device call
DENSE_DEPTHS = {"cpu": [(1, 1), (2, 2), (3, 3)], "gpu": [(1, 1), (2, 2), (4, 4)]}
DENSE_STEPS = {"cpu": 150, "gpu": 300}


def fit_saturating_exponential(n: list[float], loss: list[float]) -> dict:
    """Least-squares fit of L(n) = L_inf + A exp(-(n - 1) / tau); returns the parameters and R^2."""
    best = None
    mean = sum(loss) / len(loss)
    for i in range(400):
        tau = 10 ** (-1 + 3 * i / 399)
        basis = [math.exp(-(x - 1) / tau) for x in n]
        bm = sum(basis) / len(basis)
        var = sum((b - bm) ** 2 for b in basis)
        amp = sum((b - bm) * (y - mean) for b, y in zip(basis, loss)) / var if var > 0 else 0.0
        l_inf = mean - amp * bm
        sse = sum((l_inf + amp * b - y) ** 2 for b, y in zip(basis, loss))
        if best is None or sse < best[0]:
            best = (sse, tau, amp, l_inf)
    sse, tau, amp, l_inf = best
    sst = sum((y - mean) ** 2 for y in loss)
    return {"L_inf": l_inf, "A": amp, "tau": tau, "r2": 1 - sse / sst if sst > 0 else 1.0}


def _train(preset: str, overrides: list[str], out_dir: Path, progress: bool) -> tuple[dict, int]:
    cfg = load_config(preset, overrides=[*overrides, f"out_dir='{out_dir}'"])
    trainer = Trainer(cfg, progress=progress, overwrite=True)  # the experiment replaces its own earlier run
    summary = trainer.train()
    return summary, sum(p.numel() for p in trainer.model.parameters())


def run_loops(preset: str, out_dir: Path, overrides: list[str] = (), progress: bool = True, log=print) -> dict:
    name, base = PRESETS[preset]
    cfg = load_config(name, overrides=[*base, *overrides])
    mean = cfg.loops.mean
    sweep = sorted({1, 2, 3, *range(mean - 1, mean + 2), 2 * mean, 3 * mean, 4 * mean} - {0})
    log(f"training the {name} model ({cfg.steps} steps), then its held-out loss at {sweep} loops")
    summary, params = _train(name, [*base, f"sweep_loops={sweep}", *overrides], Path(out_dir) / "run", progress)
    rows = summary["sweep"]
    n, loss = [r["n_loops"] for r in rows], [r["loss"] for r in rows]
    fit = fit_saturating_exponential(n, loss)
    at_mean = next(r["loss"] for r in rows if r["n_loops"] == mean)
    beyond = [r["loss"] for r in rows if r["n_loops"] > mean]
    up_to = [r["loss"] for r in rows if r["n_loops"] <= mean]
    result = {"experiment": "loops", "preset": name, "params": params, "train_mean_loops": mean, "sweep": rows,
              "fit": fit, "monotone_up_to_train_depth": all(a >= b for a, b in zip(up_to, up_to[1:])),
              "max_degradation_beyond_train_depth": max((b - at_mean for b in beyond), default=0.0)}
    Path(out_dir, "loops.json").write_text(json.dumps(result, indent=1))
    _plot_loops(result, Path(out_dir))
    log(f"loop scaling: fit L(n) = {fit['L_inf']:.4f} + {fit['A']:.4f} exp(-(n-1)/{fit['tau']:.2f}), "
        f"R^2 {fit['r2']:.3f}; monotone to the training depth: {result['monotone_up_to_train_depth']}; "
        f"worst beyond it: {result['max_degradation_beyond_train_depth']:+.4f} nats")
    return result


def run_dense_vs_looped(preset: str, out_dir: Path, overrides: list[str] = (), progress: bool = True,
                        log=print) -> dict:
    name, base = PRESETS[preset]
    base = [*base, f"steps={DENSE_STEPS[preset]}"]
    out_dir = Path(out_dir)
    mean = load_config(name, overrides=[*base, *overrides]).loops.mean
    runs = []
    total = 1 + len(DENSE_DEPTHS[preset])
    log(f"[1/{total}] training the looped model ({mean} loops mean), then its held-out loss")
    summary, params = _train(name, [*base, f"sweep_loops=[{mean}]", *overrides], out_dir / "looped", progress)
    runs.append({"model": f"looped ({mean} loops mean)", "params": params, "loss": summary["sweep"][0]["loss"],
                 "looped": True})
    for i, (pre, coda) in enumerate(DENSE_DEPTHS[preset], 2):
        log(f"[{i}/{total}] training a fixed-depth model of {pre + coda + 1} layers, then its held-out loss")
        fixed = [*base, "loops.schedule='fixed'", "loops.mean=1", "loops.min_loops=1", "loops.backprop=0",
                 "sweep_loops=[1]", f"model.prelude_layers={pre}", f"model.coda_layers={coda}", *overrides]
        summary, params = _train(name, fixed, out_dir / f"fixed_{pre + coda + 1}", progress)
        runs.append({"model": f"fixed depth, {pre + coda + 1} layers", "params": params,
                     "loss": summary["sweep"][0]["loss"], "looped": False})
    result = {"experiment": "dense-vs-looped", "preset": name, "runs": runs}
    (out_dir / "dense_vs_looped.json").write_text(json.dumps(result, indent=1))
    _plot_dense(result, out_dir)
    for r in runs:
        log(f"  {r['model']:<28} {r['params']:>12,} params  held-out loss {r['loss']:.4f}")
    return result


def _save(fig, ax, xlabel: str, path: Path) -> Path:
    ax.set_xlabel(xlabel)
    ax.set_ylabel("held-out loss (nats/token)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_loops(result: dict, out_dir: Path) -> Path:
    n = [r["n_loops"] for r in result["sweep"]]
    loss = [r["loss"] for r in result["sweep"]]
    f = result["fit"]
    grid = [1 + i * (max(n) - 1) / 200 for i in range(201)]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(n, loss, "o", label="held-out loss")
    ax.plot(grid, [f["L_inf"] + f["A"] * math.exp(-(x - 1) / f["tau"]) for x in grid], "-",
            label=f"fit: {f['L_inf']:.3f} + {f['A']:.3f}·exp(-(n-1)/{f['tau']:.2f})")
    ax.axvline(result["train_mean_loops"], color="grey", ls="--", label="training mean")
    return _save(fig, ax, "loops at test time", out_dir / "loops.png")


def _plot_dense(result: dict, out_dir: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    fixed = [r for r in result["runs"] if not r["looped"]]
    looped = [r for r in result["runs"] if r["looped"]]
    ax.plot([r["params"] for r in fixed], [r["loss"] for r in fixed], "o-", label="fixed depth")
    ax.plot([r["params"] for r in looped], [r["loss"] for r in looped], "*", ms=14, label="looped")
    for r in result["runs"]:  # looped labels above their point, fixed ones below (they may coincide in x)
        last = r is fixed[-1]  # at the right edge: its label goes to the left
        ax.annotate(r["model"], (r["params"], r["loss"]), fontsize=7, textcoords="offset points",
                    xytext=(-8 if last else 8, 8 if r["looped"] else -12), ha="right" if last else "left")
    ax.xaxis.set_major_formatter(lambda x, _: f"{x / 1e6:.0f}M" if x >= 1e7 else f"{x / 1e6:.2g}M")
    ax.margins(x=0.12, y=0.12)
    return _save(fig, ax, "parameters", out_dir / "dense_vs_looped.png")

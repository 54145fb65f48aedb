"""Loop scaling and dense-vs-looped on real text (Shakespeare), through the real `Trainer`.

``loops``: train one RDT (loop count sampled per step), measure held-out loss at loop counts from 1
to 4x the training mean and fit a saturating exponential

    L(n) = L_inf + A * exp(-(n - 1) / tau)

(for each tau on a log grid, L_inf and A by linear least squares; the tau with the smallest
squared error wins). The claim under test: loss falls with loops up to the training depth and
does not degrade beyond it.

``dense-vs-looped``: the RDT (trained at n loops) against two fixed-depth transformers trained on the same
data for the same steps and tokens: parameter-matched (the same model at one loop) and FLOP-matched (n
distinct layers in place of the n loops). The claims under test: the looped model beats the
parameter-matched one, closes most of the gap to the FLOP-matched one, and does not degrade at 2x and 4x
its training depth.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..plot import plt
from ..training.config import TrainConfig, load_config
from ..training.loop import Trainer

PRESETS = {"cpu": ("shakespeare-tiny", ["steps=150", "eval_every=0"]),
           "gpu": ("shakespeare-100m", ["steps=1000", "eval_every=0"])}
# dense-vs-looped trains 3 models; the GPU preset fits one 10-minute H200 call and reads the Python standard
# library's source (12 MB for CPython 3.11: 600 steps x 32 x 512 bytes = 9.8M tokens, no window seen twice).
# One Prelude and one Coda layer around the loop, loops sampled up to 16: with 2 + 2 the loop buys 0.0-1.6%
# over the same model run once, with 1 + 1 it buys 3.3% (mean of three seeds, 1.7-5.0%;
# benchmarks/results/h200/dense-vs-looped-recipe)
DENSE_PRESETS = {
    "cpu": ("shakespeare-tiny", ["steps=150", "eval_every=0", "sample_tokens=0"]),
    "gpu": ("shakespeare-100m", ["steps=600", "eval_every=0", "sample_tokens=0", "data.source='stdlib'",
                                 "data.seq_len=512", "batch_size=32", "compile=false", "step_graph=false",
                                 "model.dim=512", "model.n_heads=8", "model.n_kv_heads=4", "model.n_experts=16",
                                 "model.expert_dim=512", "model.lora_rank=8", "model.prelude_layers=1",
                                 "model.coda_layers=1", "loops.max_sampled=16"]),
}


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


def dense_variants(cfg: TrainConfig) -> dict[str, list[str]]:
    """Overrides for the two fixed-depth baselines of a looped config trained with ``loops.mean`` = n loops:
    parameter-matched (the same model run at one loop: P + 1 + C layers) and FLOP-matched (n - 1 more distinct
    layers, split between Prelude and Coda: P + n + C layers, the looped model's depth unrolled); both without
    a loop-index embedding."""
    n, m = cfg.loops.mean, cfg.model
    # no loop-index embedding: at one loop it would only add a constant to every token (a plain transformer has none)
    one_loop = ["loops.schedule='fixed'", "loops.mean=1", "loops.min_sampled=1", "loops.backprop=0", "sweep_loops=[1]",
                "model.loop_embed_scale=0.0"]
    extra_pre = (n - 1) // 2
    return {"param_matched": one_loop,
            "flop_matched": [*one_loop, f"model.prelude_layers={m.prelude_layers + extra_pre}",
                             f"model.coda_layers={m.coda_layers + n - 1 - extra_pre}"]}


def run_dense_vs_looped(preset: str, out_dir: Path, overrides: list[str] = (), progress: bool = True,
                        log=print) -> dict:
    """Looped model vs parameter-matched and FLOP-matched fixed-depth models, equal steps and tokens.

    Report keys: ``looped_gain_vs_param_matched`` = (L_param - L_looped) / L_param at the training depth, and
    ``looped_gap_closed_vs_flop_matched`` = (L_param - L_looped) / (L_param - L_flop)."""
    name, base = DENSE_PRESETS[preset]
    base = [*base, *overrides]
    out_dir = Path(out_dir)
    cfg = load_config(name, overrides=base)
    mean = cfg.loops.mean
    sweep = sorted({1, 2, mean, 2 * mean, 4 * mean})
    log(f"[1/3] training the looped model ({mean} loops), then its held-out loss at {sweep} loops")
    summary, params = _train(name, [*base, f"sweep_loops={sweep}"], out_dir / "looped", progress)
    looped = {r["n_loops"]: r["loss"] for r in summary["sweep"]}
    runs = [{"model": f"looped ({mean} loops)", "params": params, "loss": looped[mean], "looped": True,
             "sweep": summary["sweep"]}]
    for i, (key, changes) in enumerate(dense_variants(cfg).items(), 2):
        layers = load_config(name, overrides=[*base, *changes]).model
        log(f"[{i}/3] training the {key.replace('_', '-')} fixed-depth model "
            f"({layers.prelude_layers + 1 + layers.coda_layers} layers), then its held-out loss")
        summary, params = _train(name, [*base, *changes], out_dir / key, progress)
        runs.append({"model": f"{key.replace('_', '-')} dense, "
                              f"{layers.prelude_layers + 1 + layers.coda_layers} layers",
                     "params": params, "loss": summary["sweep"][0]["loss"], "looped": False})
    l_loop, l_param, l_flop = (r["loss"] for r in runs)
    result = {"experiment": "dense-vs-looped", "preset": name, "overrides": base, "train_loops": mean,
              "runs": runs,
              "looped_gain_vs_param_matched": (l_param - l_loop) / l_param,
              "looped_gap_closed_vs_flop_matched": (l_param - l_loop) / (l_param - l_flop)
              if l_param != l_flop else None,
              "loss_at_2x_minus_train_depth": looped[2 * mean] - looped[mean],
              "loss_at_4x_minus_train_depth": looped[4 * mean] - looped[mean]}
    (out_dir / "dense_vs_looped.json").write_text(json.dumps(result, indent=1))
    _plot_dense(result, out_dir)
    for r in runs:
        log(f"  {r['model']:<34} {r['params']:>12,} params  held-out loss {r['loss']:.4f}")
    closed = result["looped_gap_closed_vs_flop_matched"]
    log(f"looped gain vs parameter-matched {result['looped_gain_vs_param_matched']:+.2%}; gap to FLOP-matched "
        f"closed {'n/a (equal losses)' if closed is None else f'{closed:.2f}'}; loss at 2x / 4x depth minus at depth: "
        f"{result['loss_at_2x_minus_train_depth']:+.4f} / {result['loss_at_4x_minus_train_depth']:+.4f}")
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
    """Held-out loss of the looped model against test-time loops, the fixed-depth baselines as lines."""
    fig, ax = plt.subplots(figsize=(6, 4))
    looped = result["runs"][0]
    ax.plot([r["n_loops"] for r in looped["sweep"]], [r["loss"] for r in looped["sweep"]], "o-",
            label=f"{looped['model']}, {looped['params'] / 1e6:.1f}M params")
    for r, style in zip(result["runs"][1:], ("--", ":")):
        ax.axhline(r["loss"], ls=style, color="grey" if style == "--" else "black",
                   label=f"{r['model']}, {r['params'] / 1e6:.1f}M params")
    ax.axvline(result["train_loops"], color="grey", lw=0.5)
    ax.set_xscale("log", base=2)
    return _save(fig, ax, "loops at test time (looped model)", out_dir / "dense_vs_looped.png")

"""`mythos plot`: PNG plots of a training run (loss curve, loop sweep)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def plot_loss(run_dir: Path, out: Path) -> Path | None:
    rows = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(Path(run_dir).name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_sweep(sweep_file: Path, out: Path) -> Path | None:
    if not Path(sweep_file).is_file():
        return None
    summary = json.loads(Path(sweep_file).read_text())
    rows = summary["sweep"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["n_loops"] for r in rows], [r["loss"] for r in rows], "o-")
    if "train_mean_loops" in summary:
        ax.axvline(summary["train_mean_loops"], color="gray", ls="--", label="training mean loops")
        ax.legend()
    ax.set_xscale("log", base=2)
    ax.set_xlabel("loops at inference (n_loops)")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("depth extrapolation: loss vs loops")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_run(run_dir: Path) -> list[Path]:
    run_dir = Path(run_dir)
    made = [plot_loss(run_dir, run_dir / "loss.png"), plot_sweep(run_dir / "sweep.json", run_dir / "sweep.png")]
    return [p for p in made if p is not None]

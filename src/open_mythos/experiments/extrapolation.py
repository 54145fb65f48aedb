"""Easy-to-hard extrapolation: train on small problems, test on larger ones at more loops.

Shared by the k-hop (``khop``), prefix-sum (``prefix-sums``) and p-hop (``p-hop``) experiments, whose settings
trees come from :func:`task_tree`. All train through the library's `Trainer` on a synthetic task
(``data.source = "task"``, training/tasks.py):

* the RDT, with the task's loop schedule (e.g. the progressive loss of Bansal et al. 2022);
* a parameter-matched fixed-depth baseline: the same model run for one loop (Prelude + the block once
  + Coda), trained on the same problems with every target supervised;
* with ``eval.unrolled = true``, also the FLOP-matched fixed-depth model: the loop unrolled into
  ``loops.mean`` distinct layers (`scaling.dense_variants`), run once.

Then exact match per problem size (hops, bits) at several inference loop counts, beside the
baseline and a guessing baseline, written to ``NAME.json`` and ``NAME.png``.

An experiment is a settings tree: the RDT's `TrainConfig` fields, ``baseline`` (overrides for the
fixed-depth model), and ``eval`` (sizes, loop counts, problems per cell). ``--set key=value`` edits it
(``steps=2000``, ``eval.loops=[1, 8]``, ``model.dim=64``); unknown keys raise ``ValueError``.
"""

from __future__ import annotations

import copy
import json
import random
import time
from pathlib import Path

import torch

from ..checks import check_int
from ..eval.perplexity import eval_mode, logits_by_loop, states_by_loop
from ..loss import IGNORE
from ..training.config import apply_overrides, config_from_dict
from ..training.distributed import unwrap
from ..training.loop import Trainer
from ..training.tasks import Task, build_task

EVAL_KEYS = {"sizes", "loops", "problems", "train_max_size", "batch_size", "stop_patience", "unrolled"}


def task_tree(name: str, task, task_args: dict, model: dict, steps: int, batch_size: int, loops: dict, device: str,
              compile_: bool, eval_: dict, data: dict | None = None) -> dict:
    """An experiment's settings tree on synthetic task ``name`` (``task``: its built instance, for seq_len and
    vocab_size): a small GQA RDT with one Prelude and one Coda layer, no LoRA and no loop embedding unless ``model``
    says otherwise, the experiments' optimiser settings, and the fixed-depth baseline (one loop, every target
    supervised). ``data`` adds data fields; ``eval_`` is the ``eval`` table."""
    return {
        "model": {"vocab_size": task.vocab_size, "max_seq_len": task.seq_len, "attn_type": "gqa",
                  "rope_theta": 10_000.0, "prelude_layers": 1, "coda_layers": 1, "n_shared_experts": 1,
                  "n_experts_per_tok": 2, "lora_rank": 0, "loop_embed_scale": 0.0, **model},
        "data": {"source": "task", "task": name, "task_args": task_args, "seq_len": task.seq_len, **(data or {})},
        "optim": {"muon_lr": 0.02, "adamw_lr": 3e-3, "warmup_steps": 100, "min_lr_ratio": 0.1},
        "loops": loops, "steps": steps, "batch_size": batch_size, "device": device, "compile": compile_,
        "log_every": 25, "eval_batches": 2, "sweep_loops": [1, loops["max_sampled"]],
        "baseline": ["loops.schedule='fixed'", "loops.mean=1", "loops.min_sampled=1", "loops.max_sampled=1",
                     "loops.warmup_steps=0", "data.task_by_loops=false"],
        "eval": eval_,
    }


def split_settings(tree: dict, overrides: list[str]) -> tuple[dict, list[str], dict, Task]:
    """(RDT TrainConfig tree, baseline overrides, eval settings, the built task) of an experiment after
    ``overrides``; ``data.source`` must be ``"task"``.

    The sequence length and vocabulary follow the task's arguments: ``data.seq_len`` is set to the task's (an
    override of it is replaced), ``model.max_seq_len`` and ``model.vocab_size`` are raised to the task's where
    smaller (``model.max_seq_len`` also to fit the longest evaluated problem), so ``--set
    data.task_args.statements=20`` needs nothing else. An ``eval.sizes`` entry the task cannot make raises the
    task's ValueError here, before any training. ``eval.train_max_size`` (the plot's largest trained size) is the
    task's ``train_max_size`` unless set."""
    tree = apply_overrides(copy.deepcopy(tree), list(overrides))
    for section in ("model", "data", "eval"):
        if not isinstance(tree.get(section, {}), dict):
            raise ValueError(f"[{section}] must be a table, got {tree[section]!r}")
    data, model = tree.get("data", {}), tree.setdefault("model", {})
    evaluation, baseline = tree.pop("eval"), tree.pop("baseline")
    unknown = sorted(set(evaluation) - EVAL_KEYS)
    if unknown:
        raise ValueError(f"unknown eval setting(s): {', '.join('eval.' + k for k in unknown)}")
    if not isinstance(baseline, list):
        raise ValueError("baseline must be a list of key=value overrides")
    for key in ("sizes", "loops"):
        if not isinstance(evaluation.get(key), list) or not evaluation[key]:
            raise ValueError(f"eval.{key} must be a non-empty list of ints >= 1, got {evaluation.get(key)!r}")
        for v in evaluation[key]:
            check_int(f"eval.{key} entry", v, 1)
    sizes = evaluation["sizes"]
    if sizes != sorted(set(sizes)):
        raise ValueError(f"eval.sizes must be increasing (the last is the largest test size), got {sizes}")
    for key in ("problems", "batch_size", "stop_patience", "train_max_size"):
        if key in evaluation:
            check_int(f"eval.{key}", evaluation[key], 1)
    if data.get("source") != "task":
        raise ValueError(f"data.source must be 'task' in an extrapolation experiment, got {data.get('source')!r}")
    task = build_task(data["task"], data.get("task_args", {}))
    data["seq_len"] = task.seq_len
    evaluation.setdefault("train_max_size", task.train_max_size)
    model["max_seq_len"] = max(model.get("max_seq_len", 0), task.seq_len)
    model["vocab_size"] = max(model.get("vocab_size", 0), task.vocab_size)
    for size in evaluation["sizes"]:
        try:
            x, _ = task.eval_batch(size, 1, random.Random(0))
        except ValueError as err:
            raise ValueError(f"eval.sizes entry {size}: {err}") from None
        model["max_seq_len"] = max(model["max_seq_len"], x.shape[1])
    if model.get("loop_output", "final") != "final":
        raise ValueError("model.loop_output must be 'final' here: the stopping rule and the loop-count grid read "
                         "the last loop's state")
    if not isinstance(evaluation.get("unrolled", False), bool):
        raise ValueError(f"eval.unrolled must be true or false, got {evaluation['unrolled']!r}")
    config_from_dict(copy.deepcopy(tree))  # validate now, before any training
    return tree, baseline, evaluation, task


def unrolled_overrides(tree: dict) -> list[str]:
    """Overrides turning the RDT of ``tree`` into its loop unrolled: ``loops.mean`` distinct layers, run once, every
    target supervised (no depth curriculum: it has one loop, like the baseline)."""
    from .scaling import dense_variants

    return [*dense_variants(config_from_dict(copy.deepcopy(tree)))["flop_matched"], "data.task_by_loops=false"]


def train(tree: dict, overrides: list[str], out_dir: Path, progress: bool) -> tuple[torch.nn.Module, Trainer, dict]:
    cfg = config_from_dict(apply_overrides(copy.deepcopy(tree), [*overrides, f"out_dir='{out_dir}'"]))
    trainer = Trainer(cfg, progress=progress, overwrite=True)  # the experiment replaces its own earlier run
    summary = trainer.train()
    return unwrap(trainer.model), trainer, summary


def last_answer_correct(pred: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per problem: is the scored answer, at the last position, exact? pred, targets (B, T) ids -> (B,) bool."""
    return pred[:, -1] == targets[:, -1]


def eval_problems(task, size: int, problems: int, batch_size: int, seed: int, device: torch.device):
    """The evaluation problems of ``size`` as (x, y) batches of at most ``batch_size`` on ``device``: the same
    problems for every model and loop count (their own seed ``seed + size``, apart from training's)."""
    rng = random.Random(seed + size)
    for start in range(0, problems, batch_size):
        x, y = task.eval_batch(size, min(batch_size, problems - start), rng)
        yield x.to(device), y.to(device)


@torch.no_grad()
def accuracy(model: torch.nn.Module, trainer: Trainer, task, size: int, n_loops: int, problems: int,
             batch_size: int, seed: int = 10_000) -> float:
    """Exact match (``task.correct``) over ``problems`` evaluation problems of ``size`` (:func:`eval_problems`)."""
    correct = 0
    with eval_mode(model):
        for x, y in eval_problems(task, size, problems, batch_size, seed, trainer.device):
            with trainer.autocast():
                logits = model(x, n_loops)
            correct += int(task.correct(logits.argmax(-1), y).sum())
    return correct / problems


@torch.no_grad()
def converged_accuracy(model: torch.nn.Module, trainer: Trainer, task, size: int, max_loops: int, patience: int,
                       problems: int, batch_size: int, seed: int = 10_000) -> tuple[float, float]:
    """Exact match when every problem stops looping by itself: at the first loop t whose prediction (the argmax
    at every supervised position) has been the same for ``patience`` loops in a row, or at ``max_loops``. The
    rule reads no answer — only which positions are answers — so no loop count is picked in hindsight (the
    fixed point of the iteration is its own stopping signal). The problems are :func:`accuracy`'s.

    Returns (exact match, mean loops run per problem)."""
    correct, loops_run = 0, 0.0
    with eval_mode(model):
        for x, y in eval_problems(task, size, problems, batch_size, seed, trainer.device):
            answers = y != IGNORE
            with trainer.autocast():
                stable = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
                stop = torch.full_like(stable, max_loops)
                final = prev = None
                for t, (_, logits) in enumerate(logits_by_loop(model, x, max_loops)):
                    pred = logits.argmax(-1)
                    if prev is None:
                        final = pred.clone()
                    else:
                        same = ((pred == prev) | ~answers).all(1)
                        stable = torch.where(same, stable + 1, torch.zeros_like(stable))
                    running = stop == max_loops
                    final[running] = pred[running]
                    stop[running & (stable >= patience)] = t + 1
                    prev = pred
            correct += int(task.correct(final, y).sum())
            loops_run += float(stop.sum())
    return correct / problems, loops_run / problems


@torch.no_grad()
def state_rms_by_loop(model: torch.nn.Module, trainer: Trainer, task, size: int, max_loops: int,
                      problems: int = 256, seed: int = 20_000) -> list[float]:
    """RMS of the recurrent state h_t over every position of ``problems`` problems of ``size``, for t = 1..max_loops.

    A diagnostic of the loop's dynamics: a state whose scale keeps growing (``injection="residual"``) lets later
    loops tell how many came before them, and shrinks the share of the injected input e in x_t = h_t + e."""
    (x, _), = eval_problems(task, size, problems, problems, seed, trainer.device)
    with eval_mode(model), trainer.autocast():
        return [float(h.float().pow(2).mean().sqrt()) for h in states_by_loop(model, x, max_loops)]


def guess_accuracy(task, size: int, problems: int, seed: int = 10_000) -> float:
    x, y = task.eval_batch(size, problems, random.Random(seed + size))
    return float(task.guess(x, y).mean())


def run(name: str, tree: dict, overrides: list[str], out_dir: Path, progress: bool = True, log=print) -> dict:
    """Train the RDT, the baseline (and the unrolled model), evaluate the size x loops grid, write ``NAME.json`` and
    ``NAME.png``."""
    out_dir = Path(out_dir)
    tree, baseline, ev, task = split_settings(tree, overrides)  # bad settings: an error before anything is written
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rdt, rdt_trainer, _ = train(tree, [], out_dir / "rdt", progress)
    t_rdt = time.perf_counter() - t0
    dense, dense_trainer, _ = train(tree, baseline, out_dir / "baseline", progress)
    t_dense = time.perf_counter() - t0 - t_rdt
    unrolled = None
    if ev.get("unrolled"):
        unrolled_changes = unrolled_overrides(tree)
        unrolled, unrolled_trainer, _ = train(tree, unrolled_changes, out_dir / "unrolled", progress)
    t_unrolled = time.perf_counter() - t0 - t_rdt - t_dense
    params = sum(p.numel() for p in rdt.parameters())
    sizes, loops = list(ev["sizes"]), list(ev["loops"])
    args = (ev["problems"], ev.get("batch_size", 256))
    grid = {}
    for n in loops:
        grid[str(n)] = [accuracy(rdt, rdt_trainer, task, s, n, *args) for s in sizes]
        log(f"  RDT {n:4d} loops: " + " ".join(f"{a:.3f}" for a in grid[str(n)]))
    patience, far = ev.get("stop_patience", 2), max(loops)
    converged = [converged_accuracy(rdt, rdt_trainer, task, s, far, patience, *args) for s in sizes]
    log("  RDT converged : " + " ".join(f"{a:.3f}" for a, _ in converged)
        + f"   (stop after {patience} unchanged loops; mean loops " + " ".join(f"{n:.1f}" for _, n in converged) + ")")
    rms = state_rms_by_loop(rdt, rdt_trainer, task, sizes[-1], far, min(ev["problems"], args[1]))
    log(f"  RDT state RMS at size {sizes[-1]}, loops 1..{far}: " + " ".join(f"{r:.3g}" for r in rms))
    dense_acc = [accuracy(dense, dense_trainer, task, s, 1, *args) for s in sizes]
    guess = [guess_accuracy(task, s, ev["problems"]) for s in sizes]
    log("  baseline      : " + " ".join(f"{a:.3f}" for a in dense_acc))
    if unrolled is not None:
        unrolled_acc = [accuracy(unrolled, unrolled_trainer, task, s, 1, *args) for s in sizes]
        log("  unrolled      : " + " ".join(f"{a:.3f}" for a in unrolled_acc))
    log("  guess         : " + " ".join(f"{a:.3f}" for a in guess))
    best = {s: max(grid[str(n)][i] for n in loops) for i, s in enumerate(sizes)}
    result = {
        "experiment": name, "settings": tree, "baseline_overrides": baseline, "eval": ev,
        "rdt_params": params, "baseline_params": sum(p.numel() for p in dense.parameters()),
        "sizes": sizes, "loops": loops, "rdt_accuracy": grid, "baseline_accuracy": dense_acc,
        "guess_accuracy": guess, "rdt_best_accuracy": [best[s] for s in sizes],
        "rdt_best_loops": [max(loops, key=lambda n: grid[str(n)][i]) for i, s in enumerate(sizes)],
        "rdt_converged_accuracy": [a for a, _ in converged], "rdt_converged_loops": [n for _, n in converged],
        "stop_patience": patience, "rdt_state_rms_by_loop": rms,
        "train_seconds": {"rdt": t_rdt, "baseline": t_dense}, "seconds": time.perf_counter() - t0,
        "device": str(rdt_trainer.device),
    }
    if unrolled is not None:
        result.update(unrolled_overrides=unrolled_changes, unrolled_accuracy=unrolled_acc,
                      unrolled_params=sum(p.numel() for p in unrolled.parameters()))
        result["train_seconds"]["unrolled"] = t_unrolled
    return result


def write(result: dict, out_dir: Path, size_label: str) -> None:
    name = result["experiment"]
    (Path(out_dir) / f"{name}.json").write_text(json.dumps(result, indent=1))
    plot(result, Path(out_dir) / f"{name}.png", size_label)


def plot(result: dict, path: Path, size_label: str) -> Path:
    from ..plot import plt

    sizes = result["sizes"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    cmap = plt.get_cmap("viridis")
    loops = result["loops"]
    for i, n in enumerate(loops):
        ax.plot(sizes, result["rdt_accuracy"][str(n)], "o-", ms=3, color=cmap(i / max(1, len(loops) - 1)),
                label=f"RDT, {n} loops")
    if "rdt_converged_accuracy" in result:
        ax.plot(sizes, result["rdt_converged_accuracy"], "s-", color="black", lw=2,
                label=f"RDT, stops when converged ({result['stop_patience']} unchanged loops)")
    if "baseline_accuracy" in result:  # absent only from a report rebuilt from an interrupted run's log
        ax.plot(sizes, result["baseline_accuracy"], "^--", color="tab:red", label="fixed depth, same parameters")
    if "unrolled_accuracy" in result:
        ax.plot(sizes, result["unrolled_accuracy"], "v--", color="tab:orange",
                label=f"fixed depth, the loop unrolled ({result['settings']['loops']['mean']} loops' layers)")
    ax.plot(sizes, result["guess_accuracy"], "k:", label="guessing")
    ax.axvline(result["eval"]["train_max_size"], color="grey", ls="--", lw=1)
    ax.set_xlabel(f"{size_label} (dashed: largest trained)")
    ax.set_ylabel("exact match")
    ax.set_ylim(-0.02, 1.02)
    if max(sizes) / max(1, min(sizes)) > 16:  # bits 8..512: log axis; hops 1..10: linear
        ax.set_xscale("log", base=2)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

"""Prefix sums (Schwarzschild et al. 2021, Bansal et al. 2022): trained on short bit strings, tested on
long ones by thinking longer.

Task (``PrefixSumTask``): a string of random bits; the target at every position is the parity of the
bits up to and including it (the cumulative sum mod 2). A problem counts as solved when every
position is right. Bansal et al. train recurrent 1-D conv nets ("DT-Recall": the input concatenated
to every iteration's input; progressive loss) on 32-bit strings and solve 512-bit strings at ~97%
with more iterations (as summarised in issue 28), where feed-forward nets fail off the training length.

Here the recurrent network is the RDT (causal attention; "recall" is its input injection ``e`` at
every loop), trained through the `Trainer` with the same progressive loss (``loops.schedule =
"progressive"``); the baseline is the same model run once. What differs from the paper: a causal
transformer instead of a bidirectional conv net, and a size that fits one GPU call.

``depth_curriculum``: with a step's loop count n, only the first n positions are supervised (a causal
model that carries the parity one position per loop has solved exactly these). Off by default (the
paper supervises every position).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import check_field_types
from ..loss import IGNORE
from . import extrapolation


@dataclass
class PrefixSumTask:
    bits: int = 32                # training strings' length
    depth_curriculum: bool = False

    def __post_init__(self) -> None:
        check_field_types(self, "data.task_args.")  # the settings a user writes
        if self.bits < 1:
            raise ValueError(f"bits must be >= 1, got {self.bits}")

    vocab_size = 2                # tokens and targets are the bits 0 / 1

    @property
    def seq_len(self) -> int:
        return self.bits

    @property
    def train_max_size(self) -> int:
        """The training strings' length (the experiments' largest trained size)."""
        return self.bits

    @staticmethod
    def eval_batch(bits: int, n: int, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` random ``bits``-bit strings (n, bits) and their prefix parities (n, bits)."""
        g = torch.Generator().manual_seed(rng.getrandbits(63))
        x = torch.randint(0, 2, (n, bits), generator=g)
        return x, x.cumsum(1) % 2

    def batch(self, n: int, rng: random.Random, n_loops: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.eval_batch(self.bits, n, rng)
        if self.depth_curriculum and n_loops is not None:
            y[:, n_loops:] = IGNORE
        return x, y

    @staticmethod
    def correct(pred: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per problem: is every position's parity right?"""
        return (pred == targets).all(1)

    @staticmethod
    def guess(x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Guessing each bit: all right with probability 2^-bits."""
        return torch.full((x.shape[0],), 0.5 ** x.shape[1])


def _tree(bits: int, model: dict, steps: int, batch_size: int, loops: dict, device: str, compile_: bool,
          eval_: dict) -> dict:
    return extrapolation.task_tree("prefix_sums", PrefixSumTask(bits), {"bits": bits},
                                   {"max_seq_len": max(eval_["sizes"]), "tie_word_embeddings": False, **model},
                                   steps, batch_size, loops, device, compile_, eval_)


PRESETS = {
    "cpu": _tree(6, dict(dim=32, n_heads=2, n_kv_heads=2, n_experts=2, expert_dim=32, max_loop_iters=4),
                 steps=12, batch_size=16, device="cpu", compile_=False,
                 loops={"schedule": "progressive", "mean": 4, "min_sampled": 1, "max_sampled": 8},
                 eval_={"sizes": [4, 6, 8, 12], "loops": [1, 4, 8, 16], "problems": 32, "batch_size": 32}),
    "gpu": _tree(32, dict(dim=128, n_heads=4, n_kv_heads=4, n_experts=4, expert_dim=128, max_loop_iters=16),
                 steps=1500, batch_size=256, device="auto", compile_=True,
                 loops={"schedule": "progressive", "mean": 20, "min_sampled": 1, "max_sampled": 40},
                 eval_={"sizes": [8, 16, 32, 48, 64, 128, 256, 512], "loops": [8, 16, 32, 48, 64, 128, 256, 512, 1024],
                        "problems": 512, "batch_size": 256}),
}
PAPER_ACCURACY = 0.97  # Bansal et al. 2022, DT-Recall + progressive loss, 32 -> 512 bits (as quoted in issue 28)


def run(preset: str, out_dir: Path, overrides: list[str] = (), progress: bool = True, log=print) -> dict:
    """Train both models on ``bits``-bit strings, evaluate at every size; writes prefix_sums.json /
    prefix_sums.png with ``extrapolation_accuracy`` (RDT, best loop count, at the largest size) and
    ``paper_accuracy`` beside it, and ``overthinking`` (the largest size at the most loops)."""
    result = extrapolation.run("prefix_sums", PRESETS[preset], list(overrides), out_dir, progress, log)
    far = max(result["loops"])
    result["extrapolation_size"] = result["sizes"][-1]
    result["extrapolation_accuracy"] = result["rdt_best_accuracy"][-1]
    result["baseline_extrapolation_accuracy"] = result["baseline_accuracy"][-1]
    result["paper_accuracy"] = PAPER_ACCURACY
    result["overthinking"] = {"bits": result["sizes"][-1], "loops": far,
                              "accuracy": result["rdt_accuracy"][str(far)][-1],
                              "best_accuracy": result["rdt_best_accuracy"][-1]}
    extrapolation.write(result, out_dir, "bits")
    return result

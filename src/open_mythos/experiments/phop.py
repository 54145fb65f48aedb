"""p-hop induction (Sanford, Hsu, Telgarsky 2024; Saunshi et al. 2025): k layers looped L times vs k layers.

Task (``PHopTask``), the definitions of Sanford et al. 2024 ("Transformers, parallel computation, and logarithmic
depth", the find/hop recursion of their task and code), positions 0-based in the character string x_0 .. x_{n-1}:

    find_0(t) = t
    find_h(t) = 1 + max{ i < find_{h-1}(t) : x_i = x_{find_{h-1}(t)} }     ("previous occurrence", then one step on)
    hop_p(t)  = x_{find_p(t)}, or NONE when some find_h(t), h <= p, has no previous occurrence

An induction head is p = 1: find the previous occurrence of the current character and output the character after
it; p-hop repeats that from the character found, p times. Characters are drawn uniformly from an alphabet of
``alphabet`` letters, each different from the one before it (Sanford et al.'s sampler; it makes "the character
after" differ from the one looked up).

A problem is ``[HOP_p, x_0, ..., x_{n-1}]`` (the hop count as a first token, Sanford et al.'s format, so one model
trains on several p); the target at x_t's position is hop_p(t) (NONE included: every position supervised, their
"full sequence" task) and the scored answer is the last position's, hop_p(n-1) — the p-hop query of Saunshi et al.
§2.1. Problems are drawn so that the scored answer exists (rejection sampling); exact match on it is the score.

Experiment (extrapolation.py): the size axis is p. The RDT is one recurrent block (no Prelude, no Coda) looped L
times, as the paper's 1-layer model looped 6 times; the parameter-matched baseline is the same model run once (the
paper's 1-layer model); ``eval.unrolled`` adds the paper's third row, L distinct layers (the loop unrolled,
scaling.dense_variants). What differs from the paper: docs/experiments.md, "p-hop induction".
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import check_field_types
from ..loss import IGNORE
from . import extrapolation

PAPER_ACCURACY = 0.995       # Saunshi et al. 2025, Table 1: 1 layer looped 6 times at p = 32 (1 layer: 0.490)
PAPER_BASELINE_ACCURACY = 0.490
PAPER_UNROLLED_ACCURACY = 0.996  # 6 distinct layers
MAX_REDRAWS = 64


@dataclass
class PHopTask:
    alphabet: int = 4            # letters; token ids 0 .. alphabet-1
    length: int = 128            # n, characters per problem (the sequence is n + 1 tokens with the hop-count token)
    max_hops: int = 16           # the largest p (sets the vocabulary: one hop-count token per p)
    train_min_hops: int = 1      # training problems (``batch``): p uniform in train_min_hops .. max_hops (every
                                 # hop-count token is trained: a p never trained would be an untrained input token)

    def __post_init__(self) -> None:
        check_field_types(self, "data.task_args.")  # the settings a user writes
        if self.alphabet < 2:
            raise ValueError(f"alphabet must be >= 2 (each letter differs from the one before it), got {self.alphabet}")
        if self.max_hops < 1:
            raise ValueError(f"max_hops must be >= 1, got {self.max_hops}")
        if self.length < self.max_hops + 2:
            raise ValueError(f"length ({self.length}) must be >= max_hops + 2 ({self.max_hops + 2}): each hop moves "
                             "at least one position back")
        if not 1 <= self.train_min_hops <= self.max_hops:
            raise ValueError(f"train_min_hops ({self.train_min_hops}) must be in [1, max_hops={self.max_hops}]")

    @property
    def none(self) -> int:
        """The target id of "no p-hop answer"."""
        return self.alphabet

    def hop_token(self, p: int) -> int:
        return self.alphabet + p

    @property
    def vocab_size(self) -> int:
        return self.alphabet + 1 + self.max_hops

    @property
    def seq_len(self) -> int:
        return self.length + 1

    @property
    def train_max_size(self) -> int:
        """The largest p training draws (the experiments' largest trained size)."""
        return self.max_hops

    def characters(self, n: int, g: torch.Generator) -> torch.Tensor:
        """(n, length) strings, each letter uniform among the ``alphabet - 1`` letters other than the one before."""
        steps = torch.randint(1, self.alphabet, (n, self.length), generator=g)
        steps[:, 0] = torch.randint(0, self.alphabet, (n,), generator=g)
        return steps.cumsum(1) % self.alphabet

    def hops(self, x: torch.Tensor, hops: torch.Tensor) -> torch.Tensor:
        """hop_p(t) at every position: x (B, n) letters, hops (B,) p per row -> (B, n) letters or ``none``."""
        b, n = x.shape
        pos = torch.arange(n).expand(b, n)
        # last[c, b, t]: the last position <= t holding letter c (-1: none); prev[b, t]: the last one < t with x_t
        last = torch.stack([torch.where(x == c, pos, -1).cummax(1).values for c in range(self.alphabet)])
        last = torch.cat([torch.full_like(last[..., :1], -1), last[..., :-1]], -1)
        prev = last.gather(0, x.unsqueeze(0)).squeeze(0)
        step = torch.where(prev >= 0, prev + 1, -1)          # find_1 as a map on positions; -1: no answer
        find = pos.clone()
        for h in range(1, int(hops.max()) + 1):
            moved = torch.where(find >= 0, step.gather(1, find.clamp(min=0)), -1)
            find = torch.where((h <= hops).unsqueeze(1), moved, find)
        return torch.where(find >= 0, x.gather(1, find.clamp(min=0)), self.none)

    def sample(self, hops: list[int], rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
        """Problems with the given hop counts, each with a scored answer: (tokens (B, seq_len), targets (B, seq_len)).
        Raises ValueError when ``length`` is too short to find p-hop answers (after ``MAX_REDRAWS`` draws)."""
        for p in hops:
            if not 1 <= p <= self.max_hops:
                raise ValueError(f"hops must be in [1, max_hops={self.max_hops}], got {p}")
        g = torch.Generator().manual_seed(rng.getrandbits(63))
        p = torch.tensor(hops)
        x = self.characters(len(hops), g)
        y = self.hops(x, p)
        for _ in range(MAX_REDRAWS):
            redo = y[:, -1] == self.none
            if not redo.any():
                break
            x[redo] = self.characters(int(redo.sum()), g)
            y[redo] = self.hops(x[redo], p[redo])
        missing = y[:, -1] == self.none
        if missing.any():
            raise ValueError(f"length {self.length} is too short: no {int(p[missing].max())}-hop answer at the last "
                             f"position in {MAX_REDRAWS} redraws; raise length or lower max_hops")
        tokens = torch.cat([self.hop_token(p).unsqueeze(1), x], 1)
        targets = torch.cat([torch.full_like(p, IGNORE).unsqueeze(1), y], 1)
        return tokens, targets

    def batch(self, n: int, rng: random.Random, n_loops: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Training problems, p uniform in train_min_hops..max_hops; every position supervised at every loop
        count (``n_loops`` is not used: no depth curriculum)."""
        return self.sample([rng.randint(self.train_min_hops, self.max_hops) for _ in range(n)], rng)

    def eval_batch(self, hops: int, n: int, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sample([hops] * n, rng)

    correct = staticmethod(extrapolation.last_answer_correct)  # the last position's p-hop answer

    def guess(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Guessing a letter uniformly: 1 / alphabet per problem."""
        return torch.full((x.shape[0],), 1 / self.alphabet)


def _tree(task: dict, model: dict, steps: int, batch_size: int, loops: dict, device: str, compile_: bool,
          eval_: dict) -> dict:
    t = PHopTask(**task)
    return extrapolation.task_tree("phop", t, task,
                                   {"prelude_layers": 0, "coda_layers": 0, "injection": "residual", **model},
                                   steps, batch_size, loops, device, compile_,
                                   {"sizes": list(range(1, t.max_hops + 1)), "unrolled": True, **eval_},
                                   data={"task_by_loops": False})


# one recurrent block looped L = 6 times, trained at 6 loops (the paper's 1 layer x 6 loops) after a warm-up at one
# loop (the library's recipe: an RDT learns content lookups at one loop and keeps them when looped, k-hop runs 8-9),
# with the residual state (a resolved position persists across loops)
PRESETS = {
    "cpu": _tree(dict(alphabet=3, length=12, max_hops=3),
                 dict(dim=32, n_heads=2, n_kv_heads=2, n_experts=2, expert_dim=32, max_loop_iters=3),
                 steps=12, batch_size=16, device="cpu", compile_=False,
                 loops={"schedule": "fixed", "mean": 3, "min_sampled": 1, "max_sampled": 3, "warmup_steps": 4},
                 eval_={"loops": [1, 3, 6], "problems": 16, "batch_size": 16}),
    "gpu": _tree(dict(alphabet=4, length=96, max_hops=16),
                 dict(dim=128, n_heads=4, n_kv_heads=4, n_experts=4, expert_dim=128, max_loop_iters=6),
                 steps=3000, batch_size=256, device="auto", compile_=True,
                 loops={"schedule": "fixed", "mean": 6, "min_sampled": 1, "max_sampled": 6, "warmup_steps": 300},
                 eval_={"loops": [1, 2, 3, 4, 6, 8, 12, 24], "problems": 512, "batch_size": 256}),
}


def run(preset: str, out_dir: Path, overrides: list[str] = (), progress: bool = True, log=print) -> dict:
    """Train the looped model, the same model run once and (``eval.unrolled``) L distinct layers on p-hop
    problems; writes phop.json / phop.png. Report keys: ``extrapolation_accuracy`` (looped, best loop count, at
    the largest p) with ``paper_accuracy`` beside it, ``trained_loops_accuracy`` (looped, at its training loop
    count ``loops.mean``), ``baseline_extrapolation_accuracy`` (one pass) and ``unrolled_extrapolation_accuracy``
    (L distinct layers)."""
    result = add_report_keys(extrapolation.run("phop", PRESETS[preset], list(overrides), out_dir, progress, log))
    extrapolation.write(result, out_dir, "hops p")
    return result


def add_report_keys(result: dict) -> dict:
    """The report keys of :func:`run` added to an extrapolation result (the looped model's grid; the baseline's and
    the unrolled model's accuracies where present); returns ``result``."""
    loops, trained = result["loops"], result["settings"]["loops"]["mean"]
    result["extrapolation_size"] = result["sizes"][-1]
    result["extrapolation_accuracy"] = result["rdt_best_accuracy"][-1]
    if trained in loops:
        result["trained_loops"] = trained
        result["trained_loops_accuracy"] = result["rdt_accuracy"][str(trained)][-1]
    if "baseline_accuracy" in result:
        result["baseline_extrapolation_accuracy"] = result["baseline_accuracy"][-1]
    if "unrolled_accuracy" in result:
        result["unrolled_extrapolation_accuracy"] = result["unrolled_accuracy"][-1]
    result["paper_accuracy"] = PAPER_ACCURACY
    result["paper_baseline_accuracy"] = PAPER_BASELINE_ACCURACY
    result["paper_unrolled_accuracy"] = PAPER_UNROLLED_ACCURACY
    far = max(loops)
    result["overthinking"] = {"hops": result["sizes"][-1], "loops": far,
                              "accuracy": result["rdt_accuracy"][str(far)][-1],
                              "best_accuracy": result["rdt_best_accuracy"][-1]}
    return result

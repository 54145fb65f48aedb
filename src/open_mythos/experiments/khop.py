"""k-hop reasoning: does a looped model solve longer chains by looping more?

Task (``KHopTask``): a straight-line program of assignments, then queries.

    x7 3 ;  x2 5 ;  x9 x7 ;  x4 x2 ;  x1 x9 ;  ...  ? x4  ? x1      ->  5, 3   (x1 <- x9 <- x7 <- 3: 3 hops)

Each statement ``var src ;`` assigns a value or an earlier variable to a fresh variable. The chains
are interleaved at random but each variable is assigned before it is used, so a causal model can
resolve every statement from the ones before it: one lookup ("which statement assigned my src?")
per hop, at every statement in parallel, and a resolved statement stays resolved (a fixed point).
Supervision is dense: at every statement's src slot the target is the value the statement resolves
to, and each query ``? var`` is answered at ``var``. The last query asks for the end of the k-hop
chain; it is the one scored (exact match). The other assignments form distractor chains no longer
than k. Every problem has the same number of statements and queries, so every sequence has the same
length whatever k. Vocabulary: ';', '?', values, variables.

Depth curriculum (``batch(..., n_loops)``): a statement at depth d of its chain (d hops from its
value) is supervised only when d <= n_loops + ``depth_slack``, a query when its variable's depth is:
a step run for n loops is asked for about what n loops can resolve (the slack: the Prelude and Coda
layers do lookups too; one pass of the 3-layer model resolves 3 hops at 98%, H100 run K1).

Experiment (extrapolation.py): the RDT is trained on k <= ``train_max_hops`` through the `Trainer`,
loops drawn by the progressive loss; the parameter-matched baseline is the same model run once;
evaluation on k = 1..max_hops, the RDT at loop counts up to 4x the hops of the largest test.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import check_field_types
from ..loss import IGNORE
from . import extrapolation

SEMI, QUERY = 0, 1
N_SPECIAL = 2  # values are ids N_SPECIAL.., variables follow them


@dataclass
class KHopTask:
    n_values: int = 10
    n_vars: int = 64
    max_hops: int = 10            # the longest chain any problem can have (sets the sequence length)
    statements: int = 16          # assignments per problem (queried chain + distractors)
    min_distractor_len: int = 1
    queries: int = 8              # queries per problem; the last one asks for the k-hop chain's end
    train_max_hops: int = 5       # training problems (``batch``): k uniform in 1..train_max_hops
    depth_slack: int = 2          # depth curriculum: n loops are asked for depths <= n + depth_slack

    def __post_init__(self) -> None:
        check_field_types(self, "data.task_args.")  # the settings a user writes
        if self.statements < self.max_hops:
            raise ValueError(f"statements ({self.statements}) must be >= max_hops ({self.max_hops})")
        if self.n_vars < self.statements:
            raise ValueError(f"n_vars ({self.n_vars}) must be >= statements ({self.statements}): one variable each")
        if not 1 <= self.queries <= self.statements:
            raise ValueError(f"queries ({self.queries}) must be in [1, statements={self.statements}]: "
                             "distinct variables")
        if self.depth_slack < 0:
            raise ValueError(f"depth_slack must be >= 0, got {self.depth_slack}")
        if not 1 <= self.train_max_hops <= self.max_hops:
            raise ValueError(f"train_max_hops ({self.train_max_hops}) must be in [1, max_hops={self.max_hops}]")

    @property
    def vocab_size(self) -> int:
        return N_SPECIAL + self.n_values + self.n_vars

    @property
    def seq_len(self) -> int:
        return 3 * self.statements + 2 * self.queries

    @property
    def train_max_size(self) -> int:
        """The most hops a training problem has (the experiments' largest trained size)."""
        return self.train_max_hops

    def value(self, i: int) -> int:
        return N_SPECIAL + i

    def var(self, i: int) -> int:
        return N_SPECIAL + self.n_values + i

    def sample(self, hops: list[int], rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of problems with the given hop counts: (tokens (B, seq_len), targets (B, seq_len)).

        ``targets`` holds, at each statement's src slot, the value the statement resolves to, and at
        each query's variable its value; IGNORE elsewhere. ``targets[:, -1]`` are the scored answers.
        """
        x, y, _ = self.sample_with_depths(hops, rng)
        return x, y

    def sample_with_depths(self, hops: list[int], rng: random.Random
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``sample`` and the depth (hops from a value, >= 1) of every target, 0 where there is none."""
        rows, targets, depths = [], [], []
        for k in hops:
            if not 1 <= k <= self.max_hops:
                raise ValueError(f"hops must be in [1, {self.max_hops}], got {k}")
            names = iter(rng.sample(range(self.n_vars), self.statements))
            chains, left = [k], self.statements - k
            while left > 0:  # distractor chains (no longer than the queried one) fill the other statements
                chains.append(min(left, rng.randint(self.min_distractor_len, max(self.min_distractor_len, k))))
                left -= chains[-1]
            stmts = []  # per chain: [(var, src, resolved value, depth)] in definition order
            for length in chains:
                src = value = self.value(rng.randrange(self.n_values))
                stmts.append([])
                for depth in range(1, length + 1):
                    var = self.var(next(names))
                    stmts[-1].append((var, src, value, depth))
                    src = var
            order = [c for c, length in enumerate(chains) for _ in range(length)]
            rng.shuffle(order)  # a random interleaving of the chains; each chain keeps its own order
            row, tgt, dep, nxt = [], [], [], [0] * len(chains)
            for c in order:
                var, src, value, depth = stmts[c][nxt[c]]
                nxt[c] += 1
                row += [var, src, SEMI]
                tgt += [IGNORE, value, IGNORE]
                dep += [0, depth, 0]
            # queries: the queried chain's end last (the scored answer), other variables before it
            others = [st for chain in stmts for st in chain if st is not stmts[0][-1]]
            for var, _, value, depth in rng.sample(others, self.queries - 1) + [stmts[0][-1]]:
                row += [QUERY, var]
                tgt += [IGNORE, value]
                dep += [0, depth]
            rows.append(row)
            targets.append(tgt)
            depths.append(dep)
        return torch.tensor(rows), torch.tensor(targets), torch.tensor(depths)

    # ---- the experiment's task interface (training/tasks.py, extrapolation.py)
    def batch(self, n: int, rng: random.Random, n_loops: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` training problems, k uniform in 1..train_max_hops; with ``n_loops``, only targets of
        depth <= n_loops + depth_slack are supervised (the depth curriculum)."""
        x, y, depth = self.sample_with_depths([rng.randint(1, self.train_max_hops) for _ in range(n)], rng)
        if n_loops is not None:
            y = y.masked_fill(depth > n_loops + self.depth_slack, IGNORE)
        return x, y

    def eval_batch(self, hops: int, n: int, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sample([hops] * n, rng)

    correct = staticmethod(extrapolation.last_answer_correct)  # the k-hop chain's end, at the last position

    def guess(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per problem, the expected exact match of guessing uniformly among the values that occur in
        it (no chain following): the bar a model must clear to show it follows chains. It rises with k
        because longer queried chains leave fewer distractor chains, hence fewer candidate values."""
        is_value = (x >= N_SPECIAL) & (x < N_SPECIAL + self.n_values)
        present = torch.zeros(x.shape[0], N_SPECIAL + self.n_values, dtype=torch.bool)
        present.scatter_(1, torch.where(is_value, x, 0), is_value)
        return present.gather(1, targets[:, -1:]).squeeze(1).float() / present.sum(1)


def _tree(task: dict, model: dict, steps: int, batch_size: int, loops: dict, device: str, compile_: bool,
          eval_: dict) -> dict:
    t = KHopTask(**task)
    return extrapolation.task_tree("khop", t, task, model, steps, batch_size, loops, device, compile_,
                                   {"sizes": list(range(1, t.max_hops + 1)), **eval_})


# the progressive loss (Bansal et al. 2022) over up to 16 loops after 500 steps at one loop, with the residual
# state (a resolved value persists across loops instead of decaying by A: H200 runs 8-9) held at a fixed scale by
# state_norm (10 hops >= 0.90 in 4 runs of 5 with it, 1 of 8 without: H200 run 11); docs/experiments.md
PRESETS = {
    "cpu": _tree(dict(n_values=4, n_vars=10, max_hops=10, statements=10, queries=2, train_max_hops=2),
                 dict(dim=32, n_heads=2, n_kv_heads=2, n_experts=2, expert_dim=32, max_loop_iters=4),
                 steps=12, batch_size=16, device="cpu", compile_=False,
                 loops={"schedule": "progressive", "mean": 2, "min_sampled": 1, "max_sampled": 4, "warmup_steps": 4},
                 eval_={"loops": [1, 2, 40], "problems": 16, "batch_size": 16}),
    "gpu": _tree(dict(n_values=8, n_vars=24, max_hops=10, statements=12, queries=6, train_max_hops=5),
                 dict(dim=128, n_heads=4, n_kv_heads=4, n_experts=4, expert_dim=128, max_loop_iters=16,
                      injection="residual", state_norm=True),
                 steps=3500, batch_size=256, device="auto", compile_=True,
                 loops={"schedule": "progressive", "mean": 4, "min_sampled": 1, "max_sampled": 16, "warmup_steps": 500},
                 eval_={"loops": [1, 2, 4, 6, 8, 10, 12, 16, 24, 40], "problems": 512, "batch_size": 256}),
}


def run(preset: str, out_dir: Path, overrides: list[str] = (), progress: bool = True, log=print) -> dict:
    """Train both models on k <= train_max_hops, evaluate k = 1..max_hops; writes khop.json / khop.png
    with ``hop10_accuracy`` (RDT, best loop count) and ``dense_hop10_accuracy`` (baseline) when
    max_hops >= 10, and ``overthinking`` (accuracy at 4x the hops, at the largest k)."""
    result = extrapolation.run("khop", PRESETS[preset], list(overrides), out_dir, progress, log)
    sizes = result["sizes"]
    if 10 in sizes:
        i = sizes.index(10)
        result["hop10_accuracy"] = result["rdt_best_accuracy"][i]
        result["dense_hop10_accuracy"] = result["baseline_accuracy"][i]
    largest, far = sizes[-1], max(result["loops"])
    result["overthinking"] = {"hops": largest, "loops": far,
                              "accuracy": result["rdt_accuracy"][str(far)][-1],
                              "best_accuracy": result["rdt_best_accuracy"][-1]}
    extrapolation.write(result, out_dir, "hops")
    return result

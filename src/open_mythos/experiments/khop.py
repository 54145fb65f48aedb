"""k-hop reasoning: does a looped model solve longer chains by looping more?

Task (``KHopTask``): a straight-line program of assignments, then queries.

    x7 3 ;  x2 5 ;  x9 x7 ;  x4 x2 ;  x1 x9 ;  ...  ? x4  ? x1      ->  5, 3   (x1 <- x9 <- x7 <- 3: 3 hops)

Each statement ``var src ;`` assigns a value or an earlier variable to a fresh variable. The chains
are interleaved at random but each variable is assigned before it is used, so a causal model can
resolve every statement from the ones before it: one lookup ("which statement assigned my src?")
per hop. Supervision is dense: at every statement's src slot the target is the value the statement
resolves to, and each query ``? var`` is answered at ``var``. The last query asks for the end of
the k-hop chain; it is the one scored (exact match). The other assignments form distractor chains
no longer than k. Every problem has the same number of statements and queries, so every sequence
has the same length whatever k. Vocabulary: ';', '?', values, variables.

Why dense supervision: with only the final answer supervised, neither an RDT nor a dense model
learned even the 1-hop lookup in 3,000 steps x 256 problems (docs/experiments.md); with several
queries per problem a 2-layer model learns 1-hop in < 2,000 CPU steps. Why a warm-up (``warmup_steps``: 1-hop
problems, the RDT at one loop) and a quiet loop
embedding (``loop_embed_scale``): an RDT does not learn the lookup from scratch while its block is
iterated, or while the loop-index embedding drowns the tokens, but keeps a lookup learned at one loop.

Experiment: an RDT (loop count sampled per step) and a dense fixed-depth transformer with the same
parameter count are trained on k <= ``train_max_hops`` with the same data, steps and optimizer,
then evaluated on k = 1..max_hops, the RDT at loop counts up to >= 4x its training mean.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import MythosConfig, check_field_types
from ..model import OpenMythos
from ..training.config import apply_overrides
from ..training.speed import compile_blocks
from .baselines import DenseTransformer, matched_dense_layers

SEMI, QUERY = 0, 1
N_SPECIAL = 2  # values are ids N_SPECIAL.., variables follow them
IGNORE = -100  # cross-entropy's ignore_index: positions without a target


@dataclass
class KHopTask:
    n_values: int = 10
    n_vars: int = 64
    max_hops: int = 10            # the longest chain any problem can have (sets the sequence length)
    statements: int = 16          # assignments per problem (queried chain + distractors)
    min_distractor_len: int = 1
    queries: int = 8              # queries per problem; the last one asks for the k-hop chain's end

    def __post_init__(self) -> None:
        check_field_types(self, "task.")
        if self.statements < self.max_hops:
            raise ValueError(f"statements ({self.statements}) must be >= max_hops ({self.max_hops})")
        if self.n_vars < self.statements:
            raise ValueError(f"n_vars ({self.n_vars}) must be >= statements ({self.statements}): one variable each")
        if not 1 <= self.queries <= self.statements:
            raise ValueError(f"queries ({self.queries}) must be in [1, statements={self.statements}]: "
                             "distinct variables")

    @property
    def vocab_size(self) -> int:
        return N_SPECIAL + self.n_values + self.n_vars

    @property
    def seq_len(self) -> int:
        return 3 * self.statements + 2 * self.queries

    def value(self, i: int) -> int:
        return N_SPECIAL + i

    def var(self, i: int) -> int:
        return N_SPECIAL + self.n_values + i

    def sample(self, hops: list[int], rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of problems with the given hop counts: (tokens (B, seq_len), targets (B, seq_len)).

        ``targets`` holds, at each statement's src slot, the value the statement resolves to, and at
        each query's variable its value; IGNORE elsewhere. ``targets[:, -1]`` are the scored answers.
        """
        rows, targets = [], []
        for k in hops:
            if not 1 <= k <= self.max_hops:
                raise ValueError(f"hops must be in [1, {self.max_hops}], got {k}")
            names = iter(rng.sample(range(self.n_vars), self.statements))
            chains, left = [k], self.statements - k
            while left > 0:  # distractor chains (no longer than the queried one) fill the other statements
                chains.append(min(left, rng.randint(self.min_distractor_len, max(self.min_distractor_len, k))))
                left -= chains[-1]
            stmts = []  # per chain: [(var, src, resolved value)] in definition order
            for length in chains:
                src = value = self.value(rng.randrange(self.n_values))
                stmts.append([])
                for _ in range(length):
                    var = self.var(next(names))
                    stmts[-1].append((var, src, value))
                    src = var
            order = [c for c, length in enumerate(chains) for _ in range(length)]
            rng.shuffle(order)  # a random interleaving of the chains; each chain keeps its own order
            row, tgt, nxt = [], [], [0] * len(chains)
            for c in order:
                var, src, value = stmts[c][nxt[c]]
                nxt[c] += 1
                row += [var, src, SEMI]
                tgt += [IGNORE, value, IGNORE]
            # queries: the queried chain's end last (the scored answer), other variables before it
            others = [st for chain in stmts for st in chain if st is not stmts[0][-1]]
            for var, _, value in rng.sample(others, self.queries - 1) + [stmts[0][-1]]:
                row += [QUERY, var]
                tgt += [IGNORE, value]
            rows.append(row)
            targets.append(tgt)
        return torch.tensor(rows), torch.tensor(targets)


@dataclass
class KHopConfig:
    task: KHopTask = field(default_factory=KHopTask)
    train_max_hops: int = 5
    eval_hops: int = 10
    model: dict = field(default_factory=lambda: dict(dim=128, n_heads=4, n_kv_heads=4, prelude_layers=1,
                                                     coda_layers=1, n_experts=8, n_shared_experts=1,
                                                     n_experts_per_tok=2, expert_dim=128, lora_rank=8,
                                                     max_loop_iters=16, attn_type="gqa", rope_theta=10_000.0,
                                                     loop_embed_scale=0.002, router_bias_update_rate=1e-2))
    loops_mean: int = 6           # training loop count ~ uniform [loops_min, 2 * mean - loops_min]
    loops_min: int = 2
    warmup_steps: int = 3000      # at most this many first steps: 1-hop problems only, the RDT at 1 loop
    warmup_until: float = 0.9     # ... ending once the batch's scored answers are this exact (docs/experiments.md)
    eval_loops: list[int] = field(default_factory=lambda: [1, 2, 4, 6, 8, 12, 16, 24])
    steps: int = 4000             # per model (RDT, then dense); docs/experiments.md has the GPU run
    batch_size: int = 256
    lr: float = 1e-3
    eval_problems: int = 512
    seed: int = 0
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    compile: bool = torch.cuda.is_available()  # torch.compile the dense model and one RDT iteration

    def __post_init__(self) -> None:
        """Reject a bad setting before anything is trained (``--set steps=abc``, ``steps=0``)."""
        check_field_types(self)
        for name in ("train_max_hops", "eval_hops", "loops_mean", "loops_min", "steps", "batch_size",
                     "eval_problems"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0 or not 0 <= self.warmup_until <= 1 or self.lr <= 0:
            raise ValueError(f"need warmup_steps >= 0, warmup_until in [0, 1] and lr > 0, got "
                             f"{self.warmup_steps}, {self.warmup_until}, {self.lr}")
        if not self.eval_loops or any(not isinstance(n, int) or n < 1 for n in self.eval_loops):
            raise ValueError(f"eval_loops must be loop counts >= 1, got {self.eval_loops}")
        MythosConfig(vocab_size=self.task.vocab_size, max_seq_len=self.task.seq_len, **self.model)  # validates it


def presets() -> dict[str, KHopConfig]:
    cpu = KHopConfig(task=KHopTask(max_hops=4, statements=8, n_vars=16, queries=4), train_max_hops=2, eval_hops=4,
                     model=dict(dim=32, n_heads=2, n_kv_heads=2, prelude_layers=1, coda_layers=1, n_experts=4,
                                n_shared_experts=1, n_experts_per_tok=2, expert_dim=32, lora_rank=4,
                                max_loop_iters=4, attn_type="gqa", loop_embed_scale=0.002,
                                router_bias_update_rate=1e-2),
                     loops_mean=2, loops_min=1, warmup_steps=10, eval_loops=[1, 2, 4, 8], steps=30, batch_size=16,
                     eval_problems=32, device="cpu", compile=False)
    return {"cpu": cpu, "gpu": KHopConfig()}


def with_overrides(cfg: KHopConfig, overrides: list[str]) -> KHopConfig:
    """``cfg`` with ``key=value`` settings (values parsed as by ``mythos train --set``): KHopConfig
    fields, ``task.X`` for KHopTask fields, ``model.X`` for the RDT's MythosConfig fields."""
    allowed = {"": {f.name for f in fields(KHopConfig)} - {"task", "model"},
               "task": {f.name for f in fields(KHopTask)}, "model": {f.name for f in fields(MythosConfig)}}
    for key in (item.partition("=")[0].strip() for item in overrides):
        section, _, name = key.rpartition(".")
        if name not in allowed.get(section, ()):
            raise ValueError(f"unknown k-hop setting {key!r}")
    tree = apply_overrides(asdict(cfg), list(overrides))
    return KHopConfig(**{**tree, "task": KHopTask(**tree["task"])})


def _value_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every resolved value: each statement's and the query's (dense supervision)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)


def train(model: torch.nn.Module, cfg: KHopConfig, loops: bool, log=print, loop_runner=None) -> dict:
    """AdamW + cosine decay on fresh problems each step (k uniform in 1..train_max_hops).

    The first steps train on 1-hop problems and run the RDT at one loop: a looped block does not
    learn the lookup from scratch, but keeps it once learned (docs/experiments.md). The warm-up ends
    when the scored answers of a batch reach ``warmup_until`` exact match (checked every 50 steps),
    or after ``warmup_steps``. ``loop_runner``: the RDT's (training.speed.compile_blocks). Returns
    {"history": [{step, loss}], "warmup_end": step}."""
    rng = random.Random(cfg.seed)  # the same problems for every model trained with this config
    runner = {} if loop_runner is None else {"loop_runner": loop_runner}
    router_rate = cfg.model.get("router_bias_update_rate", MythosConfig.router_bias_update_rate)
    loop_rng = random.Random(cfg.seed + 1)  # loop counts: a stream of their own, so the problems stay the same
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.1, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s / cfg.steps, 1.0))))
    autocast = (torch.autocast("cuda", torch.bfloat16) if cfg.device.startswith("cuda")
                else torch.autocast("cpu", enabled=False))
    history = []
    model.train()
    t0 = time.perf_counter()
    warm, warmup_end = cfg.warmup_steps > 0, 0
    for step in range(cfg.steps):
        if warm and step >= cfg.warmup_steps:
            warm, warmup_end = False, step
            log(f"  warm-up ended at step {step} (step limit)")
        max_hops = 1 if warm else cfg.train_max_hops
        x, y = cfg.task.sample([rng.randint(1, max_hops) for _ in range(cfg.batch_size)], rng)
        x, y = x.to(cfg.device), y.to(cfg.device)
        with autocast:
            if loops:
                n = 1 if warm else loop_rng.randint(cfg.loops_min, 2 * cfg.loops_mean - cfg.loops_min)
                logits = model(x, n, **runner)
            else:
                logits = model(x)
        loss = _value_loss(logits, y)
        if warm and step % 50 == 49 and (logits[:, -1].argmax(-1) == y[:, -1]).float().mean() >= cfg.warmup_until:
            warm, warmup_end = False, step + 1
            log(f"  warm-up ended at step {step + 1} (1-hop answers >= {cfg.warmup_until:.0%} exact)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if loops:
            model.update_router_bias(router_rate)
        if step % max(1, cfg.steps // 20) == 0 or step == cfg.steps - 1:
            history.append({"step": step, "loss": loss.item()})
            log(f"  step {step:5d}  loss {loss.item():.4f}  ({time.perf_counter() - t0:.0f} s)")
    return {"history": history, "warmup_end": warmup_end if not warm else cfg.steps}


def eval_batches(cfg: KHopConfig, hops: int):
    """The evaluation problems with ``hops`` hops, (tokens, targets) batches: ``eval_problems`` of
    them from a seed apart from training's, the same for every model and loop count."""
    rng = random.Random(10_000 + cfg.seed + hops)
    for start in range(0, cfg.eval_problems, cfg.batch_size):
        yield cfg.task.sample([hops] * min(cfg.batch_size, cfg.eval_problems - start), rng)


def guess_accuracy(cfg: KHopConfig, hops: int) -> float:
    """Expected exact match of guessing uniformly among the values that occur in the problem (no
    chain following): the bar a model must clear to show it follows chains. It rises with k because
    longer queried chains leave fewer distractor chains, hence fewer candidate values."""
    total = 0.0
    for x, y in eval_batches(cfg, hops):
        for row, answer in zip(x.tolist(), y[:, -1].tolist()):
            values = {t for t in row if N_SPECIAL <= t < N_SPECIAL + cfg.task.n_values}
            total += (answer in values) / len(values)
    return total / cfg.eval_problems


@torch.no_grad()
def accuracy(model: torch.nn.Module, cfg: KHopConfig, hops: int, n_loops: int | None) -> float:
    """Exact match of the scored answer on the evaluation problems with ``hops`` hops."""
    model.eval()
    correct = 0
    for x, y in eval_batches(cfg, hops):
        x, y = x.to(cfg.device), y.to(cfg.device)
        logits = model(x, n_loops) if n_loops is not None else model(x)
        correct += int((logits[:, -1].argmax(-1) == y[:, -1]).sum())
    model.train()
    return correct / cfg.eval_problems


def run(cfg: KHopConfig, out_dir: Path, log=print) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    task = cfg.task
    mcfg = MythosConfig(vocab_size=task.vocab_size, max_seq_len=task.seq_len, **cfg.model)
    rdt = OpenMythos(mcfg).to(cfg.device)
    rdt_params = sum(p.numel() for p in rdt.parameters())
    layers = matched_dense_layers(mcfg, rdt_params)
    dense = DenseTransformer(mcfg, layers).to(cfg.device)
    dense_params = sum(p.numel() for p in dense.parameters())
    runner = None
    if cfg.compile:
        runner = compile_blocks(rdt)
        dense.compile()
    log(f"k-hop: RDT {rdt_params:,} params (loops ~U[{cfg.loops_min}, {2 * cfg.loops_mean - cfg.loops_min}]); "
        f"dense {layers} layers {dense_params:,} params; train hops <= {cfg.train_max_hops}")
    t0 = time.perf_counter()
    log("training the RDT")
    rdt_train = train(rdt, cfg, loops=True, log=log, loop_runner=runner)
    log("training the dense baseline")
    dense_train = train(dense, cfg, loops=False, log=log)
    hops = list(range(1, cfg.eval_hops + 1))
    log(f"evaluating exact match on {cfg.eval_problems} problems per hop count 1..{cfg.eval_hops}, "
        f"the RDT at {cfg.eval_loops} loops")
    rdt_acc = {n: [accuracy(rdt, cfg, k, n) for k in hops] for n in cfg.eval_loops}
    dense_acc = [accuracy(dense, cfg, k, None) for k in hops]
    guess = [guess_accuracy(cfg, k) for k in hops]
    result = {"experiment": "khop", "config": asdict(cfg), "rdt_params": rdt_params, "dense_params": dense_params,
              "dense_layers": layers, "hops": hops, "rdt_accuracy": {str(n): a for n, a in rdt_acc.items()},
              "dense_accuracy": dense_acc, "guess_present_values_accuracy": guess,
              "train_history": {"rdt": rdt_train["history"], "dense": dense_train["history"]},
              "warmup_end": {"rdt": rdt_train["warmup_end"], "dense": dense_train["warmup_end"]},
              "seconds": time.perf_counter() - t0}
    (out_dir / "khop.json").write_text(json.dumps(result, indent=1))
    plot(result, out_dir)
    log("  exact match, hops:" + "".join(f"{k:5d}" for k in hops) + f"   (trained on <= {cfg.train_max_hops})")
    for n, acc in rdt_acc.items():
        log(f"  RDT  {n:3d} loops: " + " ".join(f"{a:.2f}" for a in acc))
    log("  dense          : " + " ".join(f"{a:.2f}" for a in dense_acc))
    log("  guess a value  : " + " ".join(f"{a:.2f}" for a in guess))
    return result


def plot(result: dict, out_dir: Path) -> list[Path]:
    from ..plot import plt

    hops, loops = result["hops"], [int(n) for n in result["rdt_accuracy"]]
    grid = [result["rdt_accuracy"][str(n)] for n in loops]
    train_max = result["config"]["train_max_hops"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    im = a1.imshow(grid, origin="lower", aspect="auto", vmin=0, vmax=1, cmap="viridis")
    a1.set_xticks(range(len(hops)), hops)
    a1.set_yticks(range(len(loops)), loops)
    a1.axvline(train_max - 0.5, color="white", ls="--")
    a1.set_xlabel("hops (dashed: longest trained)")
    a1.set_ylabel("loops at test time")
    a1.set_title("RDT exact match")
    fig.colorbar(im, ax=a1)
    best = [max(result["rdt_accuracy"][str(n)][i] for n in loops) for i in range(len(hops))]
    mean = result["config"]["loops_mean"]
    at_mean = min(loops, key=lambda n: abs(n - mean))
    a2.plot(hops, result["rdt_accuracy"][str(at_mean)], "o-", label=f"RDT, {at_mean} loops (≈ train mean)")
    a2.plot(hops, best, "s-", label="RDT, best loop count per hop")
    a2.plot(hops, result["dense_accuracy"], "^-", label=f"dense, {result['dense_layers']} layers (same params)")
    a2.plot(hops, result["guess_present_values_accuracy"], "k:", label="guess among the values present")
    a2.axvline(train_max + 0.5, color="grey", ls="--")
    a2.set_xlabel("hops")
    a2.set_ylabel("exact match")
    a2.set_ylim(0, 1.02)
    a2.legend()
    fig.tight_layout()
    path = Path(out_dir) / "khop.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]

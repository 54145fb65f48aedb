"""Training the exit: an objective for the ACT halting unit of a ``loop_output="final"`` model.

With ``loop_output="final"`` the LM loss reads only the last state h_D, so the halting unit
p_d = sigmoid(w . h_d + b) (``OpenMythos.halting_prob``) gets no gradient and the engine's ``act`` exit rule
(exit at the first depth d where sum_{j<=d} p_j >= threshold: ``recurrence.act_halted``) means nothing. This
module gives the unit a target in a separate short phase on the frozen language model
(``TrainConfig.exit``, run by the Trainer after the last step; docs/training.md).

The objective (Ouro's stage-II gate training, Zhu et al. 2025, "Scaling Latent Reasoning via Looped
Language Models", with a hard, monotone label): for every token i and depth d = 1..D,

    L_d(i)  = CE(next token of i | head(norm(Coda(readout(h_d)))))    per-loop loss, detached (no LM gradient)
    d*(i)   = min { d : L_d(i) <= min_{s >= d} L_s(i) + margin }       the oracle exit depth: no later loop
                                                                     improves the token by more than ``margin`` nats
    y_d(i)  = 1[d >= d*(i)]                                          halt from d* on
    loss    = mean_{i, d} BCE(p_d(i), y_d(i)),   p_d(i) = halting_prob(h_d(i))    (gradient: the halting unit only)

Why this form: Ouro's label w_d = sigmoid(k (L_{d-1} - L_d - gamma)) (continue while the *next* loop
improves the loss) is myopic: a token whose loss is flat from loop 2 to 3 and drops at loop 4 would be
told to stop at 2. The suffix minimum looks at every later loop, and the labels are monotone in d
(0 ... 0 1 ... 1), which is what the ``act`` rule's cumulative sum can express: with p_d close to y_d the
sum first reaches the threshold at d*. The oracle's loss satisfies L_{d*}(i) <= L_D(i) + margin for every
token, so an exit that follows it costs at most ``margin`` nats per token against full depth D. The
entropy-regularised expected loss (Ouro stage I) trains a *distribution* over exit loops; the ``act``
rule exits deterministically where the cumulative probability crosses 0.99, near the end of that
distribution's support, not at its mode, so that objective does not match our exit semantics.

Cost: one forward at D loops without autograd plus D Coda + LM-head passes (the per-loop logits), and a
backward through one linear layer. The per-loop losses are those of a full forward at d loops
(every position at depth d); the engine's exit differs only in that earlier tokens' keys come from
their own exit depths (``eval/early_exit.py`` measures that exactly).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from ..config import check_field_types
from ..eval.perplexity import eval_mode, logits_by_loop
from ..loss import IGNORE
from ..model import OpenMythos
from ..recurrence import act_depth

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class ExitConfig:
    """``[exit]``: the halting-unit phase after the LM's last step (off while ``steps = 0``).

    ``loops``: the depth D the labels look at (0: ``loops.max_sampled``); ``margin``: nats a later loop must
    gain for a token to keep looping; ``lr``: AdamW's learning rate for the halting unit (no weight decay)."""

    steps: int = 0
    loops: int = 0
    margin: float = 0.01
    lr: float = 1e-2

    def __post_init__(self) -> None:
        check_field_types(self, "exit.")
        if self.steps < 0:
            raise ValueError(f"exit.steps must be >= 0 (0: no exit training), got {self.steps}")
        if self.loops < 0:
            raise ValueError(f"exit.loops must be >= 0 (0: loops.max_sampled), got {self.loops}")
        if self.margin < 0:
            raise ValueError(f"exit.margin must be >= 0 nats, got {self.margin}")
        if not self.lr > 0:
            raise ValueError(f"exit.lr must be > 0, got {self.lr}")


@torch.no_grad()
def loop_losses(model: OpenMythos, x: torch.Tensor, y: torch.Tensor, n_loops: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-loop token losses L (D, B, T) fp32, states h_1..h_D (D, B, T, dim)) for ids ``x`` (B, T) and
    next-token labels ``y`` (B, T) (IGNORE: no label, loss 0). L[d-1] equals the loss of ``model(x, d)``."""
    losses, states = [], []
    for h, logits in logits_by_loop(model, x, n_loops):
        losses.append(F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE,
                                      reduction="none").view(y.shape))
        states.append(h)
    return torch.stack(losses), torch.stack(states)


def exit_labels(losses: torch.Tensor, margin: float) -> torch.Tensor:
    """Halt labels y (D, ...) in {0, 1} from per-loop losses (D, ...): y_d = 1[d >= d*], d* the first depth
    whose loss is within ``margin`` of the best loss at any later depth (module docstring)."""
    best_later = losses.flip(0).cummin(0).values.flip(0)    # min_{s >= d} L_s
    ok = losses <= best_later + margin
    return ok.float().cummax(0).values                       # monotone: halt from the first ok depth on


def oracle_depth(labels: torch.Tensor) -> torch.Tensor:
    """d* (...) of halt labels (D, ...): the first depth labelled 1 (labels end in 1: d* <= D)."""
    return labels.shape[0] - labels.sum(0) + 1


def at_depth(values: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
    """values[depth - 1] per element: (D, ...) indexed by a depth tensor (...) in 1..D."""
    return values.gather(0, (depth.long() - 1).unsqueeze(0)).squeeze(0)


def exit_objective(model: OpenMythos, states: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                   autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
                   ) -> torch.Tensor:
    """Mean BCE(p_d, y_d) over depths and the tokens in ``mask`` (B, T), p_d = halting_prob(h_d) for states
    (D, B, T, dim) and labels (D, B, T). The states are detached: the gradient reaches the halting unit only.
    Computed from the logit (``binary_cross_entropy_with_logits``): on probabilities, a logit past ~17 rounds p to
    exactly 1 in fp32, and a wrong label then costs the clamped 100 nats with zero gradient (the unit cannot
    recover)."""
    with autocast():
        logits = model.halting_logit(states.detach())
    return exit_bce(logits, labels, mask)


def exit_bce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """:func:`exit_objective` from the halting logits (D, B, T) of the states: mean BCE over depths and the
    tokens in ``mask`` (B, T)."""
    bce = F.binary_cross_entropy_with_logits(logits.float(), labels, reduction="none")
    return (bce * mask).sum() / (mask.sum() * labels.shape[0]).clamp_min(1)


@contextlib.contextmanager
def halting_unit_only(model: OpenMythos):
    """Within the context the model is in eval mode (no dropout, no MoE load counting) and only the halting
    unit's parameters require gradients; both are restored afterwards. Yields those parameters."""
    unit = list(model.recurrent.act.parameters())
    saved = [(p, p.requires_grad) for p in model.parameters()]
    with eval_mode(model):
        model.requires_grad_(False)
        for p in unit:
            p.requires_grad_(True)
        try:
            yield unit
        finally:
            for p, flag in saved:
                p.requires_grad_(flag)


def train_exit(model: OpenMythos, batches: Iterator[Batch], cfg: ExitConfig, n_loops: int,
               autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
               reduce_grads: Callable[[list[torch.Tensor]], None] | None = None) -> list[float]:
    """``cfg.steps`` AdamW steps of :func:`exit_objective` on batches (x, y) from ``batches`` (already on the
    model's device), labels from ``n_loops`` loops. The language model is frozen; only the halting unit
    changes. ``reduce_grads``: averages the unit's gradients over data-parallel ranks. Returns the
    objective of every step."""
    history = []
    with halting_unit_only(model) as unit:
        opt = torch.optim.AdamW(unit, lr=cfg.lr, weight_decay=0.0)
        for _ in range(cfg.steps):
            x, y = next(batches)
            with autocast():
                losses, states = loop_losses(model, x, y, n_loops)
            loss = exit_objective(model, states, exit_labels(losses, cfg.margin), (y != IGNORE).float(), autocast)
            loss.backward()
            if reduce_grads is not None:
                reduce_grads([p.grad for p in unit])
            opt.step()
            opt.zero_grad(set_to_none=True)
            history.append(loss.item())
    return history


@torch.no_grad()
def exit_report(model: OpenMythos, batches: list[Batch], n_loops: int, margin: float, threshold: float,
                autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> dict:
    """Token-weighted held-out figures of the exit in the training view: each token's loss is read at its exit
    depth d from a full forward in which every position ran d loops (the engine-exact measurement, earlier keys
    from their own exit depths, is ``eval.early_exit.exit_loss``): loss at full
    depth D = ``n_loops``, loss and mean depth of the oracle d* and of the ``act`` rule at ``threshold``,
    and the objective."""
    sums = dict.fromkeys(("full_loss", "oracle_loss", "oracle_depth", "act_loss", "act_depth", "objective"), 0.0)
    count, device = 0, next(model.parameters()).device
    with eval_mode(model):
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            with autocast():
                losses, states = loop_losses(model, x, y, n_loops)
            mask = (y != IGNORE).float()
            labels = exit_labels(losses, margin)
            oracle = oracle_depth(labels)
            with autocast():  # the halting unit once: p_d for the act rule, its logit for the objective
                logits = model.halting_logit(states)
            act = act_depth(torch.sigmoid(logits), threshold)
            for key, value in (("full_loss", losses[-1]), ("oracle_loss", at_depth(losses, oracle)),
                               ("oracle_depth", oracle), ("act_loss", at_depth(losses, act)), ("act_depth", act)):
                sums[key] += float((value * mask).sum())
            n = int(mask.sum())
            sums["objective"] += float(exit_bce(logits, labels, mask)) * n
            count += n
    report = {k: v / max(count, 1) for k, v in sums.items()}
    return report | {"loops": n_loops, "margin": margin, "act_threshold": threshold, "tokens": count}

"""Held-out loss / perplexity, and its sweep over loop counts (the depth-extrapolation curve); the helpers every
evaluation shares (``eval_mode``, ``states_by_loop``, ``logits_by_loop``)."""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, Sequence

import torch

from ..loss import IGNORE, lm_loss

Batch = tuple[torch.Tensor, torch.Tensor]


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Within the context ``model`` is in eval mode (no dropout, no MoE load counting); afterwards every module's
    own train/eval mode is restored (a part kept in eval mode stays so), also on an exception."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def states_by_loop(model: torch.nn.Module, ids: torch.Tensor, n_loops: int) -> Iterator[torch.Tensor]:
    """The recurrent states h_t (B, T, dim) for t = 1..n_loops of ids (B, T), from one pass through the loop
    (Prelude once, no Coda)."""
    rope = model.rope(torch.arange(ids.shape[1], device=ids.device))
    e = model.embed_prelude(ids, rope)
    h = model.initial_state(e)
    for t in range(n_loops):
        h = model.iterate(h, e, t, rope)
        yield h


def logits_by_loop(model: torch.nn.Module, ids: torch.Tensor,
                   n_loops: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(h_t, logits_t) for t = 1..n_loops from one pass through the loop (:func:`states_by_loop`), the Coda read
    after every iteration: states (B, T, dim), logits (B, T, vocab); logits_t equals ``model(ids, t)``
    (``loop_output="final"``)."""
    rope = model.rope(torch.arange(ids.shape[1], device=ids.device))
    for h in states_by_loop(model, ids, n_loops):
        yield h, model.coda_logits(model.readout(h), rope)


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, batches: Sequence[Batch], n_loops: int, device: torch.device,
                  autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> float:
    """Token-weighted mean loss over ``batches`` at ``n_loops`` recurrent iterations."""
    total, count = 0.0, 0
    with eval_mode(model):
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            with autocast():
                logits = model(x, n_loops)
            n = int((y != IGNORE).sum())
            total += lm_loss(logits, y).item() * n
            count += n
    return total / max(count, 1)


def loop_sweep(model: torch.nn.Module, batches: Sequence[Batch], loop_counts: Sequence[int],
               device: torch.device, autocast=contextlib.nullcontext) -> list[dict]:
    """[{n_loops, loss, ppl}] for every loop count: does more thinking help?"""
    rows = []
    for n in loop_counts:
        loss = evaluate_loss(model, batches, n, device, autocast)
        rows.append({"n_loops": n, "loss": loss, "ppl": math.exp(min(loss, 50.0))})
    return rows


def format_sweep(rows: list[dict]) -> str:
    lines = [f"{'loops':>6} {'loss':>8} {'ppl':>9}"]
    lines += [f"{r['n_loops']:>6} {r['loss']:>8.4f} {r['ppl']:>9.3f}" for r in rows]
    return "\n".join(lines)

"""Held-out loss with per-token early exit, computed exactly as the inference engine decodes.

Each window (B rows of T tokens) is fed through the engine's decode stages (``inference/stages.py``) with
teacher forcing: the first ``prompt_len`` tokens are prefilled at the full loop budget, then token j
(j = prompt_len .. T-2) is started, looped until the exit rule fires or the budget is reached (rows that
exit early are frozen, as in a static batch), and finished; its logits score token j+1. Every token
therefore sees earlier tokens' keys from *their own* exit depths (the engine's cache semantics: an
exited token serves its deepest keys to deeper loops, ``inference/rows.py``), which a single full
forward with per-position depths cannot reproduce.

    loss      = mean_{rows, j} CE(logits_j, token_{j+1})         (nats / token)
    mean_loops = mean_{rows, j} d_j,   d_j = the loops token j ran (its exit depth)

With ``ExitRule("none")`` every token runs the budget and the loss equals a full forward's at that many loops
on the same positions (tested).
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F

from ..inference.exit import ExitRule
from ..inference.stages import DecodeStages
from ..model import OpenMythos
from .perplexity import eval_mode


def exit_loss(model: OpenMythos, ids: torch.Tensor, prompt_len: int, budget: int, rule: ExitRule,
              loop_policy: str = "per_loop") -> dict:
    """{"loss", "mean_loops", "histogram" {depth: tokens}, "tokens"} of the windows ``ids`` (B, T) on the
    model's device, decoded with per-token exit ``rule`` and loop ``budget`` after a ``prompt_len``-token
    prefill (1 <= prompt_len <= T - 2; scored: tokens prompt_len+1 .. T-1). Runs in eval mode (no dropout, no
    MoE load counting); the model's mode is restored."""
    with eval_mode(model):
        return _exit_loss(model, ids, prompt_len, budget, rule, loop_policy)


@torch.inference_mode()
def _exit_loss(model: OpenMythos, ids: torch.Tensor, prompt_len: int, budget: int, rule: ExitRule,
               loop_policy: str) -> dict:
    if ids.dim() != 2:
        raise ValueError(f"ids must be windows of token ids (B, T), got shape {tuple(ids.shape)}")
    B, T = ids.shape
    if not 1 <= prompt_len <= T - 2:
        raise ValueError(f"prompt_len must be in [1, T - 2] = [1, {T - 2}] for windows of T={T} tokens, "
                         f"got {prompt_len}")
    stages = DecodeStages(model, B + 1, T, loop_policy, budget)  # + the scratch row (the last)
    rows = torch.arange(B, device=ids.device)
    for row in range(B):
        stages.configure(row, budget, rule, prompt_len)
    probe = rule.kind == "kl"
    last = torch.full((B,), prompt_len - 1, device=ids.device)
    stages.prefill(rows, ids[:, :prompt_len], last, budget)
    every = torch.ones(B, dtype=torch.bool, device=ids.device)
    total, depths = torch.zeros((), device=ids.device), Counter()
    for j in range(prompt_len, T - 1):
        stages.next_tok[rows] = ids[:, j]  # teacher forcing: the start stage embeds the true token
        stages.start(rows)
        done = stages.loop(rows, probe)
        while not bool(done.all()):  # the batch waits for its deepest token; exited rows are frozen
            done = stages.loop(rows, probe)
        logits, results = stages.finish(rows, every, probe)
        total += F.cross_entropy(logits.float(), ids[:, j + 1], reduction="sum")
        depths.update(results[1].tolist())
    n = B * (T - 1 - prompt_len)
    return {"loss": float(total) / n, "mean_loops": sum(d * c for d, c in depths.items()) / n,
            "histogram": dict(sorted(depths.items())), "tokens": n}

"""What goes into and comes out of the inference engine: requests, their validation, token events.

``validate_request`` is the one definition of what a request may ask for (the server and the CLI reach it
through ``Engine.submit`` / ``Engine.validate``); the checks it shares with ``OpenMythos.generate`` (token
ids, lengths, end-of-sequence ids, seed, sampling) are ``checks.py``'s and ``SamplingParams``', so the same bad
value gets the same message from both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import MythosConfig
from ..checks import SEED_RANGE  # noqa: F401 (its home before checks.py: `from .requests import SEED_RANGE` works)
from ..checks import check_generation_length, check_int, check_seed, check_token_id, check_token_list
from ..sampling import SamplingParams
from .exit import ExitRule

MAX_LOGPROBS = 20                     # most alternatives a request may ask for per token (OpenAI's limit)


@dataclass
class Request:
    prompt: list[int]
    max_new_tokens: int = 64
    n_loops: int | None = None                 # loop budget per token (default: config max_loop_iters)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    exit_rule: ExitRule = field(default_factory=ExitRule)
    eos_token_ids: tuple[int, ...] = ()
    seed: int | None = None                    # per-request generator: reproducible whatever the batch
    logprobs: int | None = None                # report each token's log-probability and this many alternatives

    def loop_budget(self, cfg: MythosConfig) -> int:
        """Loops per token: ``n_loops``, or the model's max_loop_iters."""
        return self.n_loops or cfg.max_loop_iters

    def reads_logits(self) -> bool:
        """Whether the host reads this request's logits (sampling, log-probabilities)."""
        return not self.sampling.greedy or self.logprobs is not None


@dataclass
class TokenLogprobs:
    """log p(token) under the model's distribution (log_softmax of the logits: before temperature,
    top-k and top-p) and the ``Request.logprobs`` most likely (token, log p) pairs, most likely first."""
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class TokenEvent:
    request_id: int
    token: int | None          # None only for a cancellation event
    depth: int                 # loop iterations this token ran
    finish_reason: str | None  # None while running; "stop" (eos / stop string), "length", "cancelled",
                               # "error" (this request failed; the engine logged why and serves the rest)
    logprobs: TokenLogprobs | None = None  # when the request asked for them


@dataclass
class Completion:
    request_id: int
    tokens: list[int]
    depths: list[int]
    finish_reason: str


@dataclass
class ActiveRequest:
    """A request holding an engine row (running or on standby): what the host tracks of it."""
    request_id: int
    request: Request
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    pending: bool = False       # its next token waits (in the stages' next_tok) for a start stage
    loops: int = 0              # depth schedule: loop iterations launched for the current token so far


def validate_request(r: Request, cfg: MythosConfig, context: int, max_loop_budget: int) -> None:
    """Raise ValueError naming the problem if ``r`` cannot run on an engine with ``context`` tokens per row
    and loop budgets up to ``max_loop_budget``."""
    check_token_list("prompt", r.prompt, cfg.vocab_size)
    check_generation_length(len(r.prompt), r.max_new_tokens, cfg.max_output_tokens, context,
                            "max_seq_len" if context == cfg.max_seq_len else "the engine's max_len")
    if r.n_loops is not None:
        check_int("n_loops", r.n_loops, 1, max_loop_budget, note="the engine's max_loop_budget; a deeper budget "
                  "needs Engine(max_loop_budget=...) or mythos serve --max-loop-budget")
    if not isinstance(r.sampling, SamplingParams):
        raise ValueError("sampling must be a SamplingParams")
    if not isinstance(r.exit_rule, ExitRule):
        raise ValueError("exit_rule must be an ExitRule")
    if not r.exit_rule.min_loops <= max_loop_budget:
        raise ValueError(f"exit_rule min_loops must be in [1, {max_loop_budget}] (the engine's max_loop_budget), "
                         f"got {r.exit_rule.min_loops}")
    if not isinstance(r.eos_token_ids, (list, tuple)):
        raise ValueError(f"eos_token_ids must be a tuple of token ids, got {r.eos_token_ids!r}")
    for k, i in enumerate(r.eos_token_ids):
        check_token_id(f"eos_token_ids[{k}]", i, cfg.vocab_size)
    if r.seed is not None:
        check_seed(r.seed)
    if r.logprobs is not None:
        check_int("logprobs", r.logprobs, 0, MAX_LOGPROBS, note="or None")


def token_logprobs(logits: torch.Tensor, token: int, k: int) -> TokenLogprobs:
    """``token``'s log-probability under log_softmax(logits (vocab,)) and the k most likely tokens."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    top = torch.topk(logp, min(k, logp.numel())) if k else None
    pairs = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
    return TokenLogprobs(float(logp[token]), pairs)

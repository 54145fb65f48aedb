"""Inference: the row KV cache, exit rules, decode stages, and the continuous depth-batching engine."""

from .engine import SCHEDULES, Engine
from .exit import EXIT_KINDS, ExitRule
from .requests import Completion, Request, TokenEvent, TokenLogprobs

__all__ = ["Completion", "EXIT_KINDS", "Engine", "ExitRule", "Request", "SCHEDULES", "TokenEvent", "TokenLogprobs"]

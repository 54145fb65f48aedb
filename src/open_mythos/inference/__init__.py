"""Inference: the slot KV cache, exit rules, and the continuous depth-batching engine."""

from .engine import Completion, Engine, Request, TokenEvent, TokenLogprobs
from .exit import ExitRule

__all__ = ["Completion", "Engine", "ExitRule", "Request", "TokenEvent", "TokenLogprobs"]

"""Per-token exit rules: when a decoded token leaves the recurrent loop.

After loop t has produced the state h_{t+1} (depth d = t + 1), a token exits when d reaches its
request's ``n_loops`` budget, or when its rule fires:

* ``"none"``:       never early: every token runs the full budget (the model's own forward).
* ``"act"``:        ACT: the cumulative halting probability sum_t sigmoid(w . h_t + b) reaches
                    ``threshold`` (default: the config's ``act_threshold``); ``recurrence.act_halted``.
* ``"rel_change"``: the state stops changing: ||h_{t+1} - h_t|| / ||h_{t+1}|| < ``threshold``
                    (default 1e-2); needs d >= 2.
* ``"kl"``:         successive output distributions agree: KL(p_{t+1} || p_t) < ``threshold`` nats
                    (default 5e-4, as in public recurrent-depth LMs), where p_t = softmax(head(Coda(h_t)));
                    needs d >= 2 and costs one Coda + LM-head pass per loop.

``min_loops`` keeps a token in the loop for at least that many iterations whatever the rule says.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

EXIT_KINDS = ("none", "act", "rel_change", "kl")
DEFAULT_THRESHOLDS = {"rel_change": 1e-2, "kl": 5e-4}


@dataclass(frozen=True)
class ExitRule:
    kind: str = "none"
    threshold: float | None = None
    min_loops: int = 1

    def __post_init__(self) -> None:
        if self.kind not in EXIT_KINDS:
            raise ValueError(f"exit rule kind must be one of {EXIT_KINDS}, got {self.kind!r}")
        if self.threshold is not None:
            if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                    or not 0 < self.threshold <= sys.float_info.max:
                raise ValueError(f"exit rule threshold must be a finite number > 0, got {self.threshold!r}")
            if self.kind == "act" and self.threshold > 1:
                raise ValueError(f"act exit threshold is a probability in (0, 1], got {self.threshold}")
        if isinstance(self.min_loops, bool) or not isinstance(self.min_loops, int) or self.min_loops < 1:
            raise ValueError(f"exit rule min_loops must be an int >= 1, got {self.min_loops!r}")

    def resolved_threshold(self, act_threshold: float) -> float:
        if self.threshold is not None:
            return float(self.threshold)
        return act_threshold if self.kind == "act" else DEFAULT_THRESHOLDS.get(self.kind, 0.0)

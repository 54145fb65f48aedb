"""The engine's decode state and the stages that run on it, batched over row indices.

Every cache row (one per running request, see rows.py) owns a row of the state tensors below: the
recurrent state h, the Prelude output e, the loop index t of its current token, its ACT sums. A decoded
token goes through three stages, each a call of the model's stage API (``OpenMythos.embed_prelude``,
``iterate``, ``halting_prob`` / ``act_weight``, ``readout`` + ``coda_logits``):

    start  : e = Prelude(embed(token));  h = 0;  t = 0                 (once per token)
    loop   : h <- iterate(h, e, t);  t <- t + 1                         (once per loop)
             exit when t = budget or the request's exit rule fires (see exit.py)
    finish : logits = head(norm(Coda(readout(h))));  greedy token       (once per token)

Each stage takes a row-index tensor padded to a bucket size with the scratch row (the last one), keeps
its batch shape (rows that must not change are masked, not dropped), and reads and writes the state in
place: a few fixed shapes cover every batch and each can be replayed as one CUDA graph (graphs.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model import OpenMythos
from ..recurrence import act_halted
from .exit import ExitRule
from .rows import RowKVCache


class DecodeStages:
    def __init__(self, model: OpenMythos, n_rows: int, max_len: int, loop_policy: str, max_loop_budget: int):
        self.model, self.cfg, self.max_len = model, model.cfg, max_len
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.cache = RowKVCache(n_rows, max_len, loop_policy, max_loop_budget)
        dev, D, V, n = self.device, self.cfg.dim, self.cfg.vocab_size, n_rows
        f32 = dict(device=dev, dtype=torch.float32)
        self.h = torch.zeros(n, D, device=dev, dtype=self.dtype)    # recurrent state h_t
        self.e = torch.zeros_like(self.h)                            # Prelude output of the token
        self.out = torch.zeros_like(self.h)                          # state the Coda gets if the token exits now
        self.mix = torch.zeros(n, D, **f32)                          # ACT mixture (loop_output="act")
        self.cum = torch.zeros(n, **f32)                             # ACT weight used so far (mixture)
        self.psum = torch.zeros(n, **f32)                            # sum of halting probabilities (exit rule)
        self.prev_logp = torch.zeros(n, V, **f32)                    # log p_t for the KL rule
        self.logits = torch.zeros(n, V, **f32)                       # logits of the last KL probe
        self.next_tok = torch.zeros(n, device=dev, dtype=torch.long) # the token the next start stage starts
        self.pending = torch.zeros(n, device=dev, dtype=torch.bool)  # whether next_tok waits for it
        self.t = torch.zeros(n, device=dev, dtype=torch.long)        # loops done for the current token
        self.pos = torch.zeros_like(self.t)                          # position of the current token
        self.budget = torch.ones_like(self.t)                        # loop budget (n_loops) per row
        self.min_loops = torch.ones_like(self.t)
        self.done = torch.zeros(n, device=dev, dtype=torch.bool)
        self.act_thr = torch.full((n,), float("inf"), **f32)         # inf: rule off
        self.rel_tol = torch.zeros(n, **f32)                         # 0: rule off
        self.kl_tol = torch.zeros(n, **f32)

    # ------------------------------------------------------------------------------ per-row settings
    def configure(self, row: int, budget: int, rule: ExitRule, prompt_len: int) -> None:
        """A new request in ``row``: its loop budget, exit rule and first decode position."""
        thr = rule.resolved_threshold(self.cfg.act_threshold)
        self.budget[row] = budget
        self.min_loops[row] = rule.min_loops
        self.act_thr[row] = thr if rule.kind == "act" else float("inf")
        self.rel_tol[row] = thr if rule.kind == "rel_change" else 0.0
        self.kl_tol[row] = thr if rule.kind == "kl" else 0.0
        self.pos[row] = prompt_len

    def set_next_tokens(self, rows: list[int], tokens: list[int]) -> None:
        """Host-sampled tokens replace the greedy ones the finish stage left in ``next_tok``."""
        self.next_tok[torch.tensor(rows, device=self.device)] = torch.tensor(tokens, device=self.device)

    # ------------------------------------------------------------------------------ stages
    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.rope(positions[:, None])

    def prefill(self, rows: torch.Tensor, ids: torch.Tensor, last: torch.Tensor, n_loops: int):
        """Prompt forward (B, length) at ``n_loops`` loops into the rows' cache: (logits (B, vocab) fp32 of each
        prompt's last token ``last`` (B,), results (see :meth:`results`): every row finished)."""
        logits = self.model(ids, n_loops, self.cache.bind_prefill(rows), logits_at=last).float()
        every = torch.ones_like(rows, dtype=torch.bool)
        return logits, self.results(rows, logits, torch.full_like(rows, n_loops), every)

    def results(self, rows: torch.Tensor, logits: torch.Tensor, depth: torch.Tensor, finish: torch.Tensor):
        """(3, B): greedy token, loops run, finished; the greedy token of each finished row becomes its
        next token (a host-sampled one overwrites it)."""
        greedy = logits.argmax(-1)
        self.next_tok[rows] = torch.where(finish, greedy, self.next_tok[rows])
        self.pending[rows] = self.pending[rows] | finish
        return torch.stack((greedy, depth, finish.long()))

    def start(self, rows: torch.Tensor) -> None:
        """start: e = Prelude(embed(next token)) at each row's position and a reset loop state, for the
        rows whose next token is pending; the other rows are left unchanged."""
        start, tokens = self.pending[rows], self.next_tok[rows]
        self.pending[rows] = torch.zeros_like(start)
        pos = self.pos[rows]
        self.cache.bind(rows, pos, torch.zeros_like(rows), start)
        x = self.model.embed_prelude(tokens[:, None], self._rope(pos), self.cache)
        self.e[rows] = _where_rows(start, x[:, 0], self.e[rows])
        self.h[rows] = _where_rows(start, self.model.initial_state(x[:, 0]), self.h[rows])
        for buf in (self.mix, self.cum, self.psum, self.t, self.done):
            buf[rows] = buf[rows].masked_fill(_rows_mask(start, buf), 0)

    def whole_token(self, rows: torch.Tensor, n_loops: int):
        """A whole fixed-depth token: start, n_loops loop stages, finish (no exit rule)."""
        self.start(rows)
        for _ in range(n_loops):
            self.loop(rows)
        return self.finish(rows, torch.ones_like(rows, dtype=torch.bool))

    def depth_tick(self, rows: torch.Tensor, probe: bool, start: bool, finish: bool, loops: int):
        """A depth tick: start the rows' pending tokens, run ``loops`` loop iterations of every row at its
        own depth, finish the rows whose token exited (masks, not row subsets: one shape per bucket).
        ``start`` / ``finish`` False: no row needs that stage in this tick."""
        if start:
            self.start(rows)
        for _ in range(loops):  # a row that exits is frozen by the loop stage until the finish
            done = (self.loop_probe if probe else self.loop)(rows)
        if finish:
            return (self.finish_probe if probe else self.finish)(rows, done)
        return None

    def loop_probe(self, rows: torch.Tensor) -> torch.Tensor:
        return self.loop(rows, probe=True)

    def finish_probe(self, rows: torch.Tensor, finish: torch.Tensor):
        return self.finish(rows, finish, probe=True)

    def finish(self, rows: torch.Tensor, finish: torch.Tensor, probe: bool = False):
        """(logits (B, vocab) fp32, results (3, B): see :meth:`results`) of the rows' tokens; moves the
        rows marked in ``finish`` one position on (the others write nothing)."""
        if probe:
            logits = self.logits[rows]
        else:
            logits = self._coda_logits(rows, self.pos[rows], self.out[rows], finish)
        self.pos[rows] = (self.pos[rows] + finish.long()).clamp(max=self.max_len - 1)  # clamp: the padding rows
        return logits, self.results(rows, logits, self.t[rows], finish)

    def loop(self, rows: torch.Tensor, probe: bool = False) -> torch.Tensor:
        """loop: one recurrent iteration for each of ``rows`` at its own loop index; returns which rows
        have exited (a row that had exited before stays frozen: no state or cache writes)."""
        model = self.model
        h, e, t, pos = self.h[rows], self.e[rows], self.t[rows], self.pos[rows]
        running = ~self.done[rows]
        self.cache.bind(rows, pos, t.clamp(max=self.cache.loop_slots - 1), running)
        h_new = model.iterate(h[:, None], e[:, None], t, self._rope(pos), self.cache, ("recurrent", None))[:, 0]
        depth = t + 1

        p = model.halting_prob(h_new)
        psum = self.psum[rows] + p
        rel = (h_new - h).float().norm(dim=-1) / h_new.float().norm(dim=-1).clamp_min(1e-12)
        exit_now = act_halted(psum, self.act_thr[rows]) | ((t > 0) & (rel < self.rel_tol[rows]))
        if probe:  # output distribution if the token exited now
            out = self._output_state(rows, h_new, p, last=torch.ones_like(running))[0]
            logits = self._coda_logits(rows, pos, out, running)
            logp = F.log_softmax(logits, dim=-1)
            kl = (logp.exp() * (logp - self.prev_logp[rows])).sum(-1)
            # rows without the KL rule (tolerance 0) must not exit here: their prev_logp may be stale or
            # zero (the probe did not run for their previous loop), which makes this "KL" negative
            exit_now |= (t > 0) & (self.kl_tol[rows] > 0) & (kl < self.kl_tol[rows])
        exit_now = (exit_now & (depth >= self.min_loops[rows])) | (depth >= self.budget[rows])
        out, mix, cum = self._output_state(rows, h_new, p, last=exit_now)

        def keep(new, old):  # frozen rows keep their state
            return _where_rows(running, new, old)

        self.h[rows] = keep(h_new, h)
        self.out[rows] = keep(out, self.out[rows])
        self.mix[rows], self.cum[rows] = keep(mix, self.mix[rows]), keep(cum, self.cum[rows])
        self.psum[rows] = keep(psum, self.psum[rows])
        self.t[rows] = keep(depth, t)
        if probe:
            self.prev_logp[rows] = keep(logp, self.prev_logp[rows])
            self.logits[rows] = keep(logits, self.logits[rows])
        done = self.done[rows] | exit_now
        self.done[rows] = done
        return done

    def _output_state(self, rows: torch.Tensor, h_new: torch.Tensor, p: torch.Tensor, last: torch.Tensor):
        """(Coda input state, ACT mixture, ACT weight used) if ``last`` marks the token's final loop.

        loop_output="final": the state h. "act": sum_t w_t h_t with the model's ACT weights."""
        mix, cum = self.mix[rows], self.cum[rows]
        if self.cfg.loop_output != "act":
            return h_new, mix, cum
        w = self.model.act_weight(p, cum, last)
        mix = mix + w[:, None] * h_new.float()
        return mix.to(h_new.dtype), mix, cum + w

    def _coda_logits(self, rows: torch.Tensor, pos: torch.Tensor, state: torch.Tensor,
                     write: torch.Tensor) -> torch.Tensor:
        """logits = head(norm(Coda(readout(state)))) at each row's position; fp32 (B, vocab)."""
        self.cache.bind(rows, pos, torch.zeros_like(rows), write)
        x = self.model.readout(state)[:, None]
        return self.model.coda_logits(x, self._rope(pos), self.cache)[:, 0].float()


def _rows_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-row mask (B,) shaped to broadcast over ``like`` (B, ...)."""
    return mask.view(-1, *[1] * (like.dim() - 1))


def _where_rows(mask: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Row b of ``new`` where mask[b], else of ``old``."""
    return torch.where(_rows_mask(mask, new), new, old)

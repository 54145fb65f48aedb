"""Inference engine: per-request loop budgets, per-token early exit, and continuous depth-wise batching.

Every running request owns a *row*: a row of the :class:`RowKVCache` and of the decode state (stages.py:
recurrent state h, Prelude output e, loop index t, ACT sums), on which the start / loop / finish stages run.
This module schedules them (which rows run which stage in each engine tick), pipelines the depth ticks,
and replays each stage shape from a CUDA graph (graphs.py).

``schedule="depth"`` (continuous depth-wise batching): every engine tick is ONE stage over all running
rows, replayed as one CUDA graph: it starts the pending tokens, runs ``sync_every`` loop iterations for
every row whatever its depth, and finishes the tokens that exited in it (masked per row: the batch keeps
its shape). Ticks are pipelined: the finish stage leaves each greedy token on the device for the next
start stage, so the host launches tick n + 1 before it reads (and emits) tick n's tokens. A finished
request frees its row for the next waiting one, so the recurrent block runs on a full batch at mixed
depths. With ``prefill_batch`` n > 1, waiting requests are prefilled n at a time onto n - 1 *standby*
rows beyond ``max_batch`` and take a running row as soon as one frees (docs/inference.md has the
timeline).

``schedule="static"`` (static batching, the baseline): the batch moves in lock-step, one whole token per
tick; a token that exits is frozen (no state or cache writes) until the deepest token of the batch is
done, and new requests are admitted only when the whole batch has finished. ``schedule="continuous"``
(iteration-level continuous batching, as in Orca/vLLM; formerly "token"): the same lock-step whole-token
ticks, but waiting requests take free rows at every tick. Every schedule computes the same tokens for
every request; only the work differs. For fixed-depth requests "continuous" is the default (measured
fastest under the server: docs/inference.md); "depth" pays off with early exit.

Prompts are prefilled with the full forward at the request's loop budget (exit rules apply to generated
tokens), those admitted together with the same budget as one batch padded to a bucket shape (buckets.py).
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections import Counter, deque
from dataclasses import dataclass

import torch

from ..checks import SEED_RANGE, check_int
from ..model import OpenMythos
from ..sampling import SamplingParams, sample_next
from .exit import ExitRule
from .buckets import RowIndex, batch_buckets, bucket_len
from .graphs import StageGraphs, scoped_compile
from .requests import (MAX_LOGPROBS, ActiveRequest, Completion, Request, TokenEvent, TokenLogprobs,
                       token_logprobs, validate_request)
from .stages import DecodeStages

SCHEDULES = ("depth", "continuous", "static")
SCHEDULE_ALIASES = {"token": "continuous"}  # old spellings, accepted with a DeprecationWarning
COMPILED_STAGES = ("start", "loop", "loop_probe", "finish", "finish_probe")

__all__ = ["MAX_LOGPROBS", "SEED_RANGE", "Completion", "Engine", "Request", "SCHEDULES", "TokenEvent", "TokenLogprobs",
           "resolve_schedule"]
logger = logging.getLogger(__name__)


def resolve_schedule(schedule: str) -> str:
    """The schedule's name, mapping a deprecated spelling to its new one (with a DeprecationWarning)."""
    if schedule in SCHEDULE_ALIASES:
        new = SCHEDULE_ALIASES[schedule]
        warnings.warn(f"schedule={schedule!r} is now called {new!r}", DeprecationWarning, stacklevel=3)
        return new
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    return schedule


@dataclass
class _Tick:
    """A launched depth tick whose results the host has not read yet."""
    rows: list[tuple[int, int]]          # (row, request id) of each row, in row order
    started: bool                        # whether it ran the start stage
    exits: set[int]                      # rows whose token exited in it (reached its loop budget)
    could_exit: set[int]                 # rows whose token may have exited in it (exit rule)
    logits: torch.Tensor | None          # (B, vocab) of its finish stage (a graph output: the next replay rewrites it)
    results: torch.Tensor | None         # (3, B) greedy token, loops run, finished; None: no finish stage
    ready: torch.cuda.Event | None       # set when ``results`` (a host copy on CUDA) may be read


class Engine:
    """Serves requests on ``model``, which it puts in eval mode for good (``model.train()`` to train it again)."""
    def __init__(self, model: OpenMythos, max_batch: int = 8, max_len: int | None = None,
                 loop_policy: str = "per_loop", max_loop_budget: int | None = None, schedule: str = "continuous",
                 cuda_graphs: bool | None = None, compile: bool = False, sync_every: int = 1,
                 prefill_batch: int = 1, *, max_loops: int | None = None):
        cfg = model.cfg
        schedule = resolve_schedule(schedule)
        if max_loops is not None:
            warnings.warn("Engine(max_loops=...) is now max_loop_budget", DeprecationWarning, stacklevel=2)
            max_loop_budget = max_loops if max_loop_budget is None else max_loop_budget
        check_int("max_batch", max_batch, 1)
        # depth schedule: loop iterations per tick (one graph, one host sync); a row that exits before
        # the tick's last one stays frozen until the tick's finish
        self.sync_every = check_int("sync_every", sync_every, 1)
        # while rows are running, waiting requests are admitted once this many rows are free (or all
        # of them fit), so that their prompts are prefilled as one batch instead of one by one; the
        # prefill_batch - 1 standby rows hold prefilled requests until a running row frees
        self.prefill_batch = check_int("prefill_batch", prefill_batch, 1, max_batch, hi_name="max_batch")
        if schedule == "static" and prefill_batch != 1:
            raise ValueError("prefill_batch applies to the depth and continuous schedules (static admits whole "
                             "batches)")
        max_len = cfg.max_seq_len if max_len is None else max_len
        check_int("max_len", max_len, 1, cfg.max_seq_len, hi_name="max_seq_len")
        self.model, self.cfg, self.schedule = model.eval(), cfg, schedule
        self.max_batch, self.max_len = max_batch, max_len
        # the largest loop budget a request may ask for (sizes the per_loop cache)
        self.max_loop_budget = check_int("max_loop_budget", cfg.max_loop_iters if max_loop_budget is None
                                         else max_loop_budget, 1)
        # rows: max_batch running + standby, and one "scratch" row (bucket padding points there, writes only there)
        n_rows = max_batch + prefill_batch - 1
        self.scratch = n_rows
        self.buckets = batch_buckets(max_batch)
        self.stages = DecodeStages(model, n_rows + 1, max_len, loop_policy, self.max_loop_budget)
        self.device = self.stages.device
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda"
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs=True needs the model on a CUDA device")
        self.graphs = StageGraphs() if cuda_graphs else None
        if compile:  # fuse each stage's small elementwise kernels (one compile per stage and bucket)
            for name in COMPILED_STAGES:
                setattr(self.stages, name, scoped_compile(getattr(self.stages, name), len(self.buckets),
                                                          len(COMPILED_STAGES)))
        self.waiting: deque[tuple[int, Request]] = deque()
        self.unread: deque[_Tick] = deque()   # depth ticks launched but not read (at most one)
        self.active: dict[int, ActiveRequest] = {}   # running and standby requests by row
        self.standby: deque[int] = deque()     # prefilled rows waiting to run, in admission order
        self.free = list(range(n_rows))
        self._cancel: dict[int, str] = {}
        self.rows = RowIndex(self.buckets, self.scratch, self.device)  # rows -> padded row-index tensor
        self._next_id = 0
        # work counters: loop_rows = recurrent-block row evaluations (the cost early exit saves), of which
        # lag_rows ran for requests that had already ended (a depth tick launched before the host read
        # the tick that ended them)
        self.stats = {"ticks": 0, "loop_rows": 0, "lag_rows": 0, "tokens": 0}
        self.depth_histogram: Counter[int] = Counter()  # loops run -> tokens generated with that depth

    @property
    def cache(self):
        return self.stages.cache

    @property
    def max_loops(self) -> int:
        """Deprecated name of :attr:`max_loop_budget`."""
        return self.max_loop_budget

    # ------------------------------------------------------------------------------ requests
    def submit(self, request: Request) -> int:
        """Validate and queue a request; returns its id. Errors name the offending field."""
        self.validate(request)
        rid, self._next_id = self._next_id, self._next_id + 1
        self.waiting.append((rid, request))
        return rid

    def validate(self, r: Request) -> None:
        """Raise ValueError naming the problem if ``r`` cannot run here; reads no engine state."""
        validate_request(r, self.cfg, self.max_len, self.max_loop_budget)

    def cancel(self, request_id: int, reason: str = "cancelled") -> None:
        """Stop a request at the next tick (its row is freed); unknown or finished ids are ignored."""
        self._cancel[request_id] = reason

    def has_work(self) -> bool:
        """Whether `tick` has anything to do (requests waiting or running, cancellations, an unread tick)."""
        return bool(self.waiting or self.active or self._cancel or self.unread)

    # ------------------------------------------------------------------------------ scheduling
    @torch.inference_mode()
    def tick(self) -> list[TokenEvent]:
        """One engine tick (a stage over the running rows); returns its tokens (and cancellations), in row order."""
        self.stats["ticks"] += 1
        events = self._apply_cancellations()
        if self.schedule != "static" or not self.active:
            self.admit(events)
        if self.active:
            (self.depth_tick if self.schedule == "depth" else self.whole_token_tick)(events)
        while self.unread and not self.active:  # the last tick ran only finished requests' rows
            self._read(self.unread.popleft(), events)
        return events

    def step(self) -> list[TokenEvent]:  # deprecated name of tick ("step" is a training step elsewhere)
        warnings.warn("Engine.step() is now Engine.tick()", DeprecationWarning, stacklevel=2)
        return self.tick()

    def running(self) -> list[int]:
        """The rows that the next tick runs (every occupied row that is not on standby), sorted."""
        return sorted(s for s in self.active if s not in self.standby)

    def run(self, requests: list[Request]) -> list[Completion]:
        """Submit ``requests`` and tick until all are done; completions in submission order."""
        ids = [self.submit(r) for r in requests]
        done: dict[int, Completion] = {}
        partial: dict[int, tuple[list[int], list[int]]] = {i: ([], []) for i in ids}
        while len(done) < len(ids):
            for ev in self.tick():
                toks, depths = partial[ev.request_id]
                if ev.token is not None:
                    toks.append(ev.token)
                    depths.append(ev.depth)
                if ev.finish_reason is not None:
                    done[ev.request_id] = Completion(ev.request_id, toks, depths, ev.finish_reason)
        return [done[i] for i in ids]

    def warmup(self, n_loops: int | None = None) -> int:
        """Run dummy requests through every batch bucket and every prompt-length bucket, without and
        with an exit rule (the fixed-depth whole-token stage and the start/loop/finish stages), so that
        compilation and CUDA-graph capture happen now instead of while a client waits (a server
        calls this before it listens). Each shape runs twice: a stage's first call of a shape runs
        eagerly (and compiles), the second captures its graph. Leaves no request, row or counter
        behind; returns the number of shapes."""
        if self.active or self.waiting:
            raise RuntimeError("warmup() needs an idle engine (no waiting or running requests)")
        if self.max_len < 3:
            raise ValueError(f"warmup() needs max_len >= 3 (a prompt and 2 new tokens), got {self.max_len}")
        budget = n_loops or self.cfg.max_loop_iters
        lengths = sorted({min(bucket_len(n), self.max_len) for n in range(1, self.max_len - 1)})
        shapes = [(b, n, ExitRule()) for b in self.buckets for n in lengths]
        shapes += [(b, lengths[0], ExitRule("act")) for b in self.buckets]
        for batch, length, rule in shapes + shapes:  # the longest prompt of a length bucket leaving room for 2 tokens
            prompt = [0] * min(length, self.max_len - 2)
            self.run([Request(prompt, 2, budget, SamplingParams(temperature=0), rule) for _ in range(batch)])
        self.stats = dict.fromkeys(self.stats, 0)
        self.depth_histogram.clear()
        return len(shapes)

    def _apply_cancellations(self) -> list[TokenEvent]:
        events = []
        if not self._cancel:
            return events
        for rid, reason in list(self._cancel.items()):
            if any(w[0] == rid for w in self.waiting):
                self.waiting = deque(w for w in self.waiting if w[0] != rid)
                events.append(TokenEvent(rid, None, 0, reason))
            for row, s in list(self.active.items()):
                if s.request_id == rid:
                    self._release(row)
                    events.append(TokenEvent(rid, None, 0, reason))
        self._cancel.clear()
        return events

    def admit(self, events: list[TokenEvent]) -> None:
        """Fill free running rows from standby; move waiting requests into free rows (at most
        max_batch at a time), prefill them (batched per loop budget), emit each one's first token,
        and let them run or wait on standby."""
        self._promote()
        if self.active and len(self.free) < min(self.prefill_batch, len(self.waiting)):
            return
        by_budget: dict[int, list[int]] = {}
        while self.free and self.waiting and len(self.standby) < self.max_batch:
            rid, req = self.waiting.popleft()
            row = self.free.pop(0)
            self.active[row] = ActiveRequest(rid, req, None)
            self.standby.append(row)
            try:
                if req.seed is not None:
                    self.active[row].generator = torch.Generator(device=self.device).manual_seed(req.seed)
                self.stages.configure(row, req.loop_budget(self.cfg), req.exit_rule, len(req.prompt))
            except Exception as err:  # this request only: the others are admitted as usual
                self._fail(row, err, events)
                continue
            by_budget.setdefault(req.loop_budget(self.cfg), []).append(row)
        for n_loops, rows in by_budget.items():
            self._sample(self._pairs(rows), *self.prefill(rows, n_loops), events)
        self._promote()

    def _promote(self) -> None:
        """Standby requests take the free running rows, first admitted first."""
        while self.standby and len(self.active) - len(self.standby) < self.max_batch:
            self.standby.popleft()

    def _fail(self, row: int, err: Exception, events: list[TokenEvent]) -> None:
        """End the row's request with finish reason "error" after an exception in its own host work
        (admission, sampling): logged with its traceback; the other requests keep running."""
        rid = self.active[row].request_id
        logger.error("request %d failed; the engine serves the others", rid, exc_info=err)
        events.append(TokenEvent(rid, None, 0, "error"))
        self._release(row)

    def _release(self, row: int) -> None:
        del self.active[row]
        if row in self.standby:  # a request can end at its first token, before it ran
            self.standby.remove(row)
        self.free.append(row)
        self.free.sort()

    def depth_tick(self, events: list[TokenEvent]) -> None:
        """start + ``sync_every`` loop iterations + finish for every running row, as one stage, then
        read the tokens of the tick before it (pipelined: the host reads tick n while the GPU runs
        tick n + 1; the device starts greedy tokens itself). The start runs only if a row may have a
        token to start, the finish only if some row's token may exit in this tick."""
        running = self.running()
        unread = self.unread[-1] if self.unread else None
        probe = self._needs_probe(running)
        start, exits, could_exit = False, set(), set()
        for s in running:
            st = self.active[s]
            maybe = False
            if st.pending or (unread is not None and s in unread.exits):  # a token waits to start
                start, st.pending, st.loops = True, False, 0
            elif unread is not None and s in unread.could_exit:  # may have exited: the device starts it if so
                start = maybe = True
            st.loops += self.sync_every
            rule = st.request.exit_rule
            if st.loops >= st.request.loop_budget(self.cfg):
                exits.add(s)
            elif maybe or (rule.kind != "none" and st.loops >= rule.min_loops):
                could_exit.add(s)
        finish = bool(exits or could_exit)
        self.stats["loop_rows"] += len(running) * self.sync_every
        rows = self.rows(running)
        stage = functools.partial(self.stages.depth_tick, probe=probe, start=start, finish=finish,
                                  loops=self.sync_every)
        out = self.run_stage(stage, ("depth", rows.numel(), probe, start, finish), rows)
        logits, results, ready = None, None, None
        if finish:
            logits, results = out
            if self.device.type == "cuda":  # copied to the host behind the tick, read after the next launch
                host = torch.empty(results.shape, dtype=results.dtype, pin_memory=True)
                results = host.copy_(results, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record()
            elif self.graphs is not None:  # a graph output: the next tick's replay rewrites it before it is read
                results = results.clone()
        self.unread.append(_Tick(self._pairs(running), start, exits, could_exit, logits, results, ready))
        # host sampling (temperature > 0) must write its token before the next tick starts it, and
        # logits read on the host must be read before the next tick's graph replay overwrites them
        keep = int(not any(self.active[s].request.reads_logits() for s in running))
        while len(self.unread) > keep:
            self._read(self.unread.popleft(), events)

    def _read(self, tick: _Tick, events: list[TokenEvent]) -> None:
        """Emit the tokens that exited in ``tick``; a row whose next token the tick after it has
        already started (on the device) counts that tick's loops for it."""
        ended = sum(1 for row, rid in tick.rows if row not in self.active or self.active[row].request_id != rid)
        self.stats["lag_rows"] += ended * self.sync_every
        if tick.results is None:
            return
        if tick.ready is not None:
            tick.ready.synchronize()
        self._sample(tick.rows, tick.logits, tick.results, events, self.unread[0] if self.unread else None)

    def whole_token_tick(self, events: list[TokenEvent]) -> None:
        """static / continuous schedules: one whole token for every running row, in lock-step."""
        running = self.running()
        probe = self._needs_probe(running)
        if all(self.active[s].request.exit_rule.kind == "none" for s in running):
            # fixed depths: start, max-budget loops and finish run as one stage, without a host sync
            n_loops = max(self.active[s].request.loop_budget(self.cfg) for s in running)
            self.stats["loop_rows"] += len(running) * n_loops
            rows = self.rows(running)
            stage = functools.partial(self.stages.whole_token, n_loops=n_loops)
            self._sample(self._pairs(running), *self.run_stage(stage, ("token", rows.numel(), n_loops), rows), events)
            return
        rows = self.rows(running)
        for s in running:
            self.active[s].pending = False
        self.run_stage(self.stages.start, ("start", rows.numel()), rows)
        loop = self.stages.loop_probe if probe else self.stages.loop
        while True:  # the batch waits for its deepest token
            self.stats["loop_rows"] += len(running)
            if bool(self.run_stage(loop, ("loop", rows.numel(), probe), rows)[: len(running)].all()):
                break
        finish = self.stages.finish_probe if probe else self.stages.finish
        every = torch.ones_like(rows, dtype=torch.bool)
        self._sample(self._pairs(running), *self.run_stage(finish, ("finish", rows.numel(), probe), rows, every),
                     events)

    def _needs_probe(self, rows: list[int]) -> bool:
        return any(self.active[s].request.exit_rule.kind == "kl" for s in rows)

    # ------------------------------------------------------------------------------ stage calls
    # Each stage runs on a row-index tensor padded to a bucket size with the scratch row (buckets.py).
    def _pairs(self, rows: list[int]) -> list[tuple[int, int]]:
        return [(s, self.active[s].request_id) for s in rows]

    def run_stage(self, stage, key: tuple, *inputs: torch.Tensor):
        """``stage(*inputs)``, replayed from the CUDA graph of shape ``key`` when cuda_graphs is on."""
        return self.graphs(key, stage, *inputs) if self.graphs is not None else stage(*inputs)

    def prefill(self, running: list[int], n_loops: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt forward of the rows' requests at ``n_loops`` loops, as one batch right-padded to a
        length bucket: the logits (B, vocab) fp32 of each prompt's last token and its results
        (every row finished at n_loops; see DecodeStages.results)."""
        prompts = [self.active[s].request.prompt for s in running]
        length = min(bucket_len(max(map(len, prompts))), self.max_len)
        rows = self.rows(running)
        ids = torch.zeros(rows.numel(), length, dtype=torch.long)
        last = torch.zeros(rows.numel(), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.tensor(p)
            last[i] = len(p) - 1
        stage = functools.partial(self.stages.prefill, n_loops=n_loops)
        key = ("prefill", rows.numel(), length, n_loops)
        return self.run_stage(stage, key, rows, ids.to(self.device), last.to(self.device))

    def _sample(self, rows: list[tuple[int, int]], logits: torch.Tensor, results: torch.Tensor,
                events: list[TokenEvent], later: _Tick | None = None) -> None:
        """Emit the next token of every (row, request id) whose token finished, unless the row has
        changed hands since: greedy, the stage's argmax (already in ``next_tok`` on the device);
        otherwise sampled here from its logits with the request's generator and written there.
        ``later``: the tick launched after the one read, which started the next token of the rows in
        it whose token may have exited (the host learns here which did)."""
        greedy, depth, finished = results[:, : len(rows)].tolist()  # one host sync for all rows
        restarted = set(later.rows) if later is not None and later.started else set()
        sampled = []
        for i, (row, rid) in enumerate(rows):
            s = self.active.get(row)
            if not finished[i] or s is None or s.request_id != rid:
                continue
            token, logprobs = greedy[i], None
            try:
                if not s.request.sampling.greedy:
                    token = int(sample_next(logits[i: i + 1], s.request.sampling, s.generator)[0])
                if s.request.logprobs is not None:
                    logprobs = token_logprobs(logits[i], token, s.request.logprobs)
            except Exception as err:  # this request only (e.g. a NaN in its logits)
                self._fail(row, err, events)
                continue
            if not s.request.sampling.greedy:
                sampled.append((row, token))
            if self._emit(row, token, depth[i], events, logprobs):
                if (row, rid) in restarted:
                    s.loops = self.sync_every
                    if row in later.exits and s.loops < s.request.loop_budget(self.cfg):
                        later.exits.discard(row)  # it counted the loops of the token that exited here
                        later.could_exit.add(row)
                else:
                    s.pending = True
        if sampled:
            self.stages.set_next_tokens(*map(list, zip(*sampled)))

    def _emit(self, row: int, token: int, depth: int, events: list[TokenEvent],
              logprobs: TokenLogprobs | None = None) -> bool:
        """Record and emit the row's token; False if it ends the request (the row is freed)."""
        s = self.active[row]
        s.tokens.append(token)
        self.stats["tokens"] += 1
        self.depth_histogram[depth] += 1
        reason = None
        if token in s.request.eos_token_ids:
            reason = "stop"
        elif len(s.tokens) >= s.request.max_new_tokens:
            reason = "length"
        events.append(TokenEvent(s.request_id, token, depth, reason, logprobs))
        if reason is not None:
            self._release(row)
        return reason is None


"""Inference engine: static slot cache, per-request loop budgets, per-token early exit, and
continuous depth-wise batching.

Every running request owns a *slot*: a row of the :class:`SlotKVCache` and of the engine's state
tensors (recurrent state h, Prelude output e, loop depth t, ACT sums). A decoded token goes through
three stages; the scheduler runs each stage batched over the slots that are in it:

    start  : e = Prelude(embed(token));  h = h_0(e);  t = 0             (once per token)
    loop   : h <- RecurrentBlock.step(h, e, loop t);  t <- t + 1        (once per loop)
             exit when t = n_loops or the request's exit rule fires (see exit.py)
    finish : logits = head(norm(Coda(out_norm(h))));  sample           (once per token)

``schedule="depth"`` (continuous depth-wise batching): every engine tick is ONE stage over all
running slots, replayed as one CUDA graph: it starts the pending tokens, runs one loop iteration
(``sync_every``: k) for every slot whatever its depth, and finishes the tokens that exited in it
(all three masked per row, so the batch keeps its shape; start and finish are left out of ticks
where no row can need them). Ticks are pipelined: the finish stage leaves each greedy token on the
device for the next start stage, so the host launches tick n + 1 before it reads (and emits) tick
n's tokens, and its work overlaps the GPU's. A finished request frees its slot for the
next waiting one, so the recurrent block runs on a full batch of work at mixed depths. With
``prefill_batch`` n > 1, prompts are prefilled n at a time ahead of need: the cache has n - 1
*standby* rows beyond ``max_batch``, a batch of waiting requests is admitted and prefilled once n
rows are free, and its requests wait prefilled on standby until a running slot frees, so a freed
slot is refilled at the next tick without a prefill of its own:

    tick      1    2    3    4    5    6
    slot 0   a1·0 a1·1 a1·2 a2·0 a2·1 a3·0       (a1·0 = request a, token 1, loop 0)
    slot 1   b1·0 b1·1 b1·2 b1·3 b1·4 b1·5       b1 is a hard token: it keeps looping
    slot 2   c1·0 c2·0 c3·0 c3·1 d1·0 d1·1       c finishes at tick 4; d takes the slot

``schedule="static"`` (the baseline): the batch moves in lock-step, one whole token per tick; a
token that exits is frozen (no state or cache writes) until the deepest token of the batch is done,
and new requests are admitted only when the whole batch has finished. ``schedule="token"``
(iteration-level continuous batching, as in Orca/vLLM): the same lock-step whole-token ticks, but
waiting requests take free slots at every tick. Every schedule computes the same tokens for every
request; only the work differs.

Prompts are prefilled with the full-sequence forward at the request's full loop budget (exit
rules apply to generated tokens): the requests admitted in one tick with the same budget form one
batch, right-padded to a power-of-two length, so each (batch, length) bucket is one CUDA graph.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter, deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..layers import rope_angles
from ..model import OpenMythos
from ..recurrence import loop_embeddings
from ..sampling import SamplingParams, sample_next
from .exit import ExitRule
from .graphs import StageGraphs
from .slots import SlotKVCache

SCHEDULES = ("depth", "token", "static")
SEED_RANGE = (-2 ** 63, 2 ** 64 - 1)  # what torch.Generator.manual_seed takes
MAX_LOGPROBS = 20                     # most alternatives a request may ask for per token (OpenAI's limit)
logger = logging.getLogger(__name__)


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
class _Slot:
    request_id: int
    request: Request
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    pending: bool = False       # its next token waits (in the engine's next_tok) for a `start` stage
    loops: int = 0              # depth schedule: loop iterations launched for the current token so far


@dataclass
class _Tick:
    """A launched depth tick whose results the host has not read yet."""
    rows: list[tuple[int, int]]          # (slot, request id) of each row, in row order
    started: bool                        # whether it ran the start stage
    exits: set[int]                      # slots whose token exited in it (reached its loop budget)
    could_exit: set[int]                 # slots whose token may have exited in it (exit rule)
    logits: torch.Tensor | None          # (B, vocab) of its finish stage (static: overwritten by the next replay)
    results: torch.Tensor | None         # (3, B) greedy token, loops run, finished; None: no finish stage
    ready: torch.cuda.Event | None       # set when ``results`` (a host copy on CUDA) may be read


class Engine:
    def __init__(self, model: OpenMythos, max_batch: int = 8, max_len: int | None = None,
                 loop_policy: str = "per_loop", max_loops: int | None = None, schedule: str = "depth",
                 cuda_graphs: bool | None = None, compile: bool = False, sync_every: int = 1,
                 prefill_batch: int = 1):
        cfg = model.cfg
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
        if isinstance(sync_every, bool) or not isinstance(sync_every, int) or sync_every < 1:
            raise ValueError(f"sync_every must be an int >= 1, got {sync_every!r}")
        if isinstance(prefill_batch, bool) or not isinstance(prefill_batch, int) or not 1 <= prefill_batch <= max_batch:
            raise ValueError(f"prefill_batch must be an int in [1, max_batch={max_batch}], got {prefill_batch!r}")
        if schedule == "static" and prefill_batch != 1:
            raise ValueError("prefill_batch applies to the depth and token schedules (static admits whole batches)")
        # depth schedule: loop iterations per tick (one graph, one host sync); a row that exits before
        # the tick's last one stays frozen until the tick's finish
        self.sync_every = sync_every
        # while slots are running, waiting requests are admitted once this many rows are free (or all
        # of them fit), so that their prompts are prefilled as one batch instead of one by one; the
        # prefill_batch - 1 standby rows hold prefilled requests until a running slot frees
        self.prefill_batch = prefill_batch
        max_len = cfg.max_seq_len if max_len is None else max_len
        if not 1 <= max_len <= cfg.max_seq_len:
            raise ValueError(f"max_len must be in [1, max_seq_len={cfg.max_seq_len}], got {max_len}")
        self.model, self.cfg, self.schedule = model.eval(), cfg, schedule
        self.max_batch, self.max_len = max_batch, max_len
        self.max_loops = cfg.max_loop_iters if max_loops is None else max_loops
        if self.max_loops < 1:
            raise ValueError(f"max_loops must be >= 1, got {self.max_loops}")
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        # rows: max_batch running + standby, and one "scratch" row: rows padded up to a bucket size
        # point at it and write only there
        n_rows = max_batch + prefill_batch - 1
        self.scratch = n_rows
        self._buckets = sorted({min(2 ** i, max_batch) for i in range(max_batch.bit_length() + 1)})
        self.cache = SlotKVCache(n_rows + 1, max_len, loop_policy, self.max_loops)
        self.loop_table = loop_embeddings(cfg.max_loop_iters, cfg.dim, cfg.loop_embed_scale, self.device, self.dtype)
        self._alloc_state(n_rows + 1)
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda"
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs=True needs the model on a CUDA device")
        self.graphs = StageGraphs() if cuda_graphs else None
        if compile:  # fuse each stage's small elementwise kernels (one compile per stage and bucket)
            stages = ("_start_stage", "_loop_stage", "_loop_stage_probe", "_finish_stage", "_finish_stage_probe")
            for name in stages:
                setattr(self, name, torch.compile(getattr(self, name), dynamic=False))
            # dynamo counts a function's compiled variants over every engine of the process; past its
            # limit (default 8) a stage would silently run uncompiled, so each engine makes room for its own
            dynamo = torch._dynamo.config
            dynamo.recompile_limit += len(self._buckets)
            dynamo.accumulated_recompile_limit += len(stages) * len(self._buckets)
        self.waiting: deque[tuple[int, Request]] = deque()
        self._unread: deque[_Tick] = deque()   # depth ticks launched but not read (at most one)
        self.slots: dict[int, _Slot] = {}      # running and standby requests by row
        self.standby: deque[int] = deque()     # prefilled rows waiting to run, in admission order
        self.free = list(range(n_rows))
        self._cancel: dict[int, str] = {}
        self._row_tensors: dict[tuple, torch.Tensor] = {}
        self._token_stages: dict[int, object] = {}
        self._prefill_stages: dict[int, object] = {}
        self._next_id = 0
        # work counters: loop_rows = recurrent-block row evaluations (the cost early exit saves), of which
        # lag_rows ran for requests that had already ended (a depth tick launched before the host read
        # the tick that ended them)
        self.stats = {"ticks": 0, "loop_rows": 0, "lag_rows": 0, "tokens": 0}
        self.depth_histogram: Counter[int] = Counter()  # loops run -> tokens generated with that depth

    def _alloc_state(self, n: int) -> None:
        dev, D, V = self.device, self.cfg.dim, self.cfg.vocab_size
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
        self.budget = torch.ones_like(self.t)                        # n_loops per slot
        self.min_loops = torch.ones_like(self.t)
        self.done = torch.zeros(n, device=dev, dtype=torch.bool)
        self.act_thr = torch.full((n,), float("inf"), **f32)         # inf: rule off
        self.rel_tol = torch.zeros(n, **f32)                         # 0: rule off
        self.kl_tol = torch.zeros(n, **f32)

    # ------------------------------------------------------------------------------ requests
    def submit(self, request: Request) -> int:
        """Validate and queue a request; returns its id. Errors name the offending field."""
        self.validate(request)
        rid, self._next_id = self._next_id, self._next_id + 1
        self.waiting.append((rid, request))
        return rid

    def validate(self, r: Request) -> None:
        """Raise ValueError naming the problem if ``r`` cannot run here; reads no engine state."""
        cfg = self.cfg
        if not isinstance(r.prompt, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                              for i in r.prompt):
            raise ValueError("prompt must be a list of token ids (ints)")
        if len(r.prompt) == 0:
            raise ValueError("prompt is empty: need at least one token")
        bad = [i for i in r.prompt if not 0 <= i < cfg.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is out of range [0, vocab_size={cfg.vocab_size})")
        if len(r.prompt) >= self.max_len:
            raise ValueError(f"prompt of {len(r.prompt)} tokens is too long: the context holds {self.max_len}")
        n = r.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {n!r}")
        if n > cfg.max_output_tokens:
            raise ValueError(f"max_new_tokens={n} exceeds max_output_tokens={cfg.max_output_tokens}")
        if len(r.prompt) + n > self.max_len:
            raise ValueError(f"prompt ({len(r.prompt)} tokens) + max_new_tokens ({n}) exceeds the context "
                             f"of {self.max_len} tokens")
        loops = r.n_loops
        if loops is not None and (isinstance(loops, bool) or not isinstance(loops, int)
                                  or not 1 <= loops <= self.max_loops):
            raise ValueError(f"n_loops must be an int in [1, {self.max_loops}] (the engine's max_loops; a deeper "
                             f"budget needs Engine(max_loops=...) or mythos serve --max-loops), got {loops!r}")
        if not isinstance(r.sampling, SamplingParams):
            raise ValueError("sampling must be a SamplingParams")
        if not isinstance(r.exit_rule, ExitRule):
            raise ValueError("exit_rule must be an ExitRule")
        if not r.exit_rule.min_loops <= self.max_loops:
            raise ValueError(f"exit_rule min_loops must be in [1, {self.max_loops}] (the engine's max_loops), "
                             f"got {r.exit_rule.min_loops}")
        if any(not isinstance(i, int) or not 0 <= i < cfg.vocab_size for i in r.eos_token_ids):
            raise ValueError(f"eos_token_ids must be token ids in [0, {cfg.vocab_size})")
        if r.seed is not None and (isinstance(r.seed, bool) or not isinstance(r.seed, int)
                                   or not SEED_RANGE[0] <= r.seed <= SEED_RANGE[1]):
            raise ValueError(f"seed must be an int in [{SEED_RANGE[0]}, {SEED_RANGE[1]}], got {r.seed!r}")
        k = r.logprobs
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be an int in [0, {MAX_LOGPROBS}] or None, got {k!r}")

    def cancel(self, request_id: int, reason: str = "cancelled") -> None:
        """Stop a request at the next tick (its slot is freed); unknown or finished ids are ignored."""
        self._cancel[request_id] = reason

    def has_work(self) -> bool:
        """Whether `step` has anything to do (waiting or running requests, pending cancellations,
        a tick whose tokens are not read yet)."""
        return bool(self.waiting or self.slots or self._cancel or self._unread)

    # ------------------------------------------------------------------------------ scheduling
    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """One engine tick; returns the tokens produced (and cancellations), in slot order."""
        self.stats["ticks"] += 1
        events = self._apply_cancellations()
        if self.schedule != "static" or not self.slots:
            self._admit(events)
        if self.slots:
            (self._depth_tick if self.schedule == "depth" else self._static_tick)(events)
        while self._unread and not self.slots:  # the last tick ran only finished requests' rows
            self._read(self._unread.popleft(), events)
        return events

    def running(self) -> list[int]:
        """The rows that the next tick runs (every occupied row that is not on standby), sorted."""
        return sorted(s for s in self.slots if s not in self.standby)

    def run(self, requests: list[Request]) -> list[Completion]:
        """Submit ``requests`` and step until all are done; completions in submission order."""
        ids = [self.submit(r) for r in requests]
        done: dict[int, Completion] = {}
        partial: dict[int, tuple[list[int], list[int]]] = {i: ([], []) for i in ids}
        while len(done) < len(ids):
            for ev in self.step():
                toks, depths = partial[ev.request_id]
                if ev.token is not None:
                    toks.append(ev.token)
                    depths.append(ev.depth)
                if ev.finish_reason is not None:
                    done[ev.request_id] = Completion(ev.request_id, toks, depths, ev.finish_reason)
        return [done[i] for i in ids]

    def warmup(self, n_loops: int | None = None) -> int:
        """Run dummy requests through every batch bucket and every prompt-length bucket, without and
        with an exit rule (the fixed-depth token stage and the start/loop/finish stages), so that
        compilation and CUDA-graph capture happen now instead of while a client waits (a server
        calls this before it listens). Each shape runs twice: a stage's first call of a shape runs
        eagerly (and compiles), the second captures its graph. Leaves no request, slot or counter
        behind; returns the number of shapes."""
        if self.slots or self.waiting:
            raise RuntimeError("warmup() needs an idle engine (no waiting or running requests)")
        if self.max_len < 3:
            raise ValueError(f"warmup() needs max_len >= 3 (a prompt and 2 new tokens), got {self.max_len}")
        budget = n_loops or self.cfg.max_loop_iters
        lengths = sorted({min(self._bucket_len(n), self.max_len) for n in range(1, self.max_len - 1)})
        shapes = [(b, n, ExitRule()) for b in self._buckets for n in lengths]
        shapes += [(b, lengths[0], ExitRule("act")) for b in self._buckets]
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
            for slot, s in list(self.slots.items()):
                if s.request_id == rid:
                    self._release(slot)
                    events.append(TokenEvent(rid, None, 0, reason))
        self._cancel.clear()
        return events

    def _admit(self, events: list[TokenEvent]) -> None:
        """Fill free running slots from standby; move waiting requests into free rows (at most
        max_batch at a time), prefill them (batched per loop budget), emit each one's first token,
        and let them run or wait on standby."""
        self._promote()
        if self.slots and len(self.free) < min(self.prefill_batch, len(self.waiting)):
            return
        by_budget: dict[int, list[int]] = {}
        while self.free and self.waiting and len(self.standby) < self.max_batch:
            rid, req = self.waiting.popleft()
            slot = self.free.pop(0)
            self.slots[slot] = _Slot(rid, req, None)
            self.standby.append(slot)
            try:
                if req.seed is not None:
                    self.slots[slot].generator = torch.Generator(device=self.device).manual_seed(req.seed)
                self._configure_slot(slot, req)
            except Exception as err:  # this request only: the others are admitted as usual
                self._fail(slot, err, events)
                continue
            by_budget.setdefault(self._loop_budget(req), []).append(slot)
        for n_loops, slots in by_budget.items():
            self._sample(self._pairs(slots), *self._prefill(slots, n_loops), events)
        self._promote()

    def _promote(self) -> None:
        """Standby requests take the free running slots, first admitted first."""
        while self.standby and len(self.slots) - len(self.standby) < self.max_batch:
            self.standby.popleft()

    def _configure_slot(self, slot: int, req: Request) -> None:
        rule = req.exit_rule
        thr = rule.resolved_threshold(self.cfg.act_threshold)
        self.budget[slot] = self._loop_budget(req)
        self.min_loops[slot] = rule.min_loops
        self.act_thr[slot] = thr if rule.kind == "act" else float("inf")
        self.rel_tol[slot] = thr if rule.kind == "rel_change" else 0.0
        self.kl_tol[slot] = thr if rule.kind == "kl" else 0.0
        self.pos[slot] = len(req.prompt)

    def _loop_budget(self, req: Request) -> int:
        """Loops per token for ``req``: its n_loops, or the model's max_loop_iters."""
        return req.n_loops or self.cfg.max_loop_iters

    def _fail(self, slot: int, err: Exception, events: list[TokenEvent]) -> None:
        """End the slot's request with finish reason "error" after an exception in its own host work
        (admission, sampling): logged with its traceback; the other requests keep running."""
        rid = self.slots[slot].request_id
        logger.error("request %d failed; the engine serves the others", rid, exc_info=err)
        events.append(TokenEvent(rid, None, 0, "error"))
        self._release(slot)

    def _reads_logits(self, request: Request) -> bool:
        """Whether the host reads the request's logits (sampling, log-probabilities)."""
        return not request.sampling.greedy or request.logprobs is not None

    def _release(self, slot: int) -> None:
        del self.slots[slot]
        if slot in self.standby:  # a request can end at its first token, before it ran
            self.standby.remove(slot)
        self.free.append(slot)
        self.free.sort()

    def _depth_tick(self, events: list[TokenEvent]) -> None:
        """start + ``sync_every`` loop iterations + finish for every running slot, as one stage, then
        read the tokens of the tick before it (pipelined: the host reads tick n while the GPU runs
        tick n + 1; the device starts greedy tokens itself). The start runs only if a slot may have a
        token to start, the finish only if some slot's token may exit in this tick."""
        slots = self.running()
        unread = self._unread[-1] if self._unread else None
        probe = self._needs_probe(slots)
        start, exits, could_exit = False, set(), set()
        for s in slots:
            st = self.slots[s]
            maybe = False
            if st.pending or (unread is not None and s in unread.exits):  # a token waits to start
                start, st.pending, st.loops = True, False, 0
            elif unread is not None and s in unread.could_exit:  # may have exited: the device starts it if so
                start = maybe = True
            st.loops += self.sync_every
            rule = st.request.exit_rule
            if st.loops >= self._loop_budget(st.request):
                exits.add(s)
            elif maybe or (rule.kind != "none" and st.loops >= rule.min_loops):
                could_exit.add(s)
        finish = bool(exits or could_exit)
        self.stats["loop_rows"] += len(slots) * self.sync_every
        rows = self._rows(slots)
        stage = functools.partial(self._depth_stage, probe=probe, start=start, finish=finish)
        out = self._run(stage, ("depth", rows.numel(), probe, start, finish), rows)
        logits, results, ready = None, None, None
        if finish:
            logits, results = out
            if self.device.type == "cuda":  # copied to the host behind the tick, read after the next launch
                results = torch.empty(results.shape, dtype=results.dtype, pin_memory=True).copy_(results, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record()
        self._unread.append(_Tick(self._pairs(slots), start, exits, could_exit, logits, results, ready))
        # host sampling (temperature > 0) must write its token before the next tick starts it, and
        # logits read on the host must be read before the next tick's graph replay overwrites them
        keep = int(not any(self._reads_logits(self.slots[s].request) for s in slots))
        while len(self._unread) > keep:
            self._read(self._unread.popleft(), events)

    def _read(self, tick: _Tick, events: list[TokenEvent]) -> None:
        """Emit the tokens that exited in ``tick``; a slot whose next token the tick after it has
        already started (on the device) counts that tick's loops for it."""
        ended = sum(1 for slot, rid in tick.rows if slot not in self.slots or self.slots[slot].request_id != rid)
        self.stats["lag_rows"] += ended * self.sync_every
        if tick.results is None:
            return
        if tick.ready is not None:
            tick.ready.synchronize()
        self._sample(tick.rows, tick.logits, tick.results, events, self._unread[0] if self._unread else None)

    def _static_tick(self, events: list[TokenEvent]) -> None:
        slots = self.running()
        probe = self._needs_probe(slots)
        if all(self.slots[s].request.exit_rule.kind == "none" for s in slots):
            # fixed depths: start, max-budget loops and finish run as one stage, without a host sync
            n_loops = max(self._loop_budget(self.slots[s].request) for s in slots)
            self.stats["loop_rows"] += len(slots) * n_loops
            rows = self._rows(slots)
            stage = self._token_stages.setdefault(n_loops, lambda r: self._token_stage(r, n_loops))
            self._sample(self._pairs(slots), *self._run(stage, ("token", rows.numel(), n_loops), rows), events)
            return
        self._start(slots)
        while not bool(self._loop(slots, probe).all()):  # the batch waits for its deepest token
            pass
        self._finish(slots, probe, events)

    def _needs_probe(self, slots: list[int]) -> bool:
        return any(self.slots[s].request.exit_rule.kind == "kl" for s in slots)

    # ------------------------------------------------------------------------------ stages
    # Each stage runs on a row-index tensor padded to a bucket size with the scratch slot, so that
    # a few fixed shapes cover every batch and each can be replayed from a CUDA graph.
    def _bucket(self, n: int) -> int:
        """The padded batch size for n rows."""
        return next(b for b in self._buckets if b >= n)

    def _rows(self, slots: list[int]) -> torch.Tensor:
        key = tuple(slots)
        if key not in self._row_tensors:
            if len(self._row_tensors) >= 4096:  # subsets of slots are many: a long-running server must not grow
                self._row_tensors.clear()
            pad = [self.scratch] * (self._bucket(len(slots)) - len(slots))
            self._row_tensors[key] = torch.tensor(slots + pad, device=self.device)
        return self._row_tensors[key]

    def _pairs(self, slots: list[int]) -> list[tuple[int, int]]:
        return [(s, self.slots[s].request_id) for s in slots]

    def _run(self, stage, key: tuple, *inputs: torch.Tensor):
        return self.graphs(key, stage, *inputs) if self.graphs is not None else stage(*inputs)

    def _start(self, slots: list[int]) -> None:
        for s in slots:
            self.slots[s].pending = False
        rows = self._rows(slots)
        self._run(self._start_stage, ("start", rows.numel()), rows)

    def _loop(self, slots: list[int], probe: bool) -> torch.Tensor:
        self.stats["loop_rows"] += len(slots)
        rows = self._rows(slots)
        return self._run(self._loop_stage_probe if probe else self._loop_stage, ("loop", rows.numel(), probe),
                         rows)[: len(slots)]

    def _finish(self, slots: list[int], probe: bool, events: list[TokenEvent]) -> None:
        """finish stage: logits of the exited tokens (from the KL probe if it ran), sample, emit."""
        rows = self._rows(slots)
        every = torch.ones_like(rows, dtype=torch.bool)
        self._sample(self._pairs(slots), *self._run(self._finish_stage_probe if probe else self._finish_stage,
                                                    ("finish", rows.numel(), probe), rows, every), events)

    def _sample(self, rows: list[tuple[int, int]], logits: torch.Tensor, results: torch.Tensor,
                events: list[TokenEvent], later: _Tick | None = None) -> None:
        """Emit the next token of every (slot, request id) row whose token finished, unless the slot
        has changed hands since: greedy, the stage's argmax (already in ``next_tok`` on the device);
        otherwise sampled here from its logits with the request's generator and written there.
        ``later``: the tick launched after the one read, which started the next token of the rows in
        it whose token may have exited (the host learns here which did)."""
        greedy, depth, finished = results[:, : len(rows)].tolist()  # one host sync for all rows
        restarted = set(later.rows) if later is not None and later.started else set()
        sampled = []
        for i, (slot, rid) in enumerate(rows):
            s = self.slots.get(slot)
            if not finished[i] or s is None or s.request_id != rid:
                continue
            token, logprobs = greedy[i], None
            try:
                if not s.request.sampling.greedy:
                    token = int(sample_next(logits[i: i + 1], s.request.sampling, s.generator)[0])
                if s.request.logprobs is not None:
                    logprobs = _token_logprobs(logits[i], token, s.request.logprobs)
            except Exception as err:  # this request only (e.g. a NaN in its logits)
                self._fail(slot, err, events)
                continue
            if not s.request.sampling.greedy:
                sampled.append((slot, token))
            if self._emit(slot, token, depth[i], events, logprobs):
                if (slot, rid) in restarted:
                    s.loops = self.sync_every
                    if slot in later.exits and s.loops < self._loop_budget(s.request):
                        later.exits.discard(slot)  # it counted the loops of the token that exited here
                        later.could_exit.add(slot)
                else:
                    s.pending = True
        if sampled:
            slots, tokens = zip(*sampled)
            self.next_tok[torch.tensor(slots, device=self.device)] = torch.tensor(tokens, device=self.device)

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_angles(positions[:, None], self.cfg.rope_dim, self.cfg.rope_theta)

    def _prefill(self, slots: list[int], n_loops: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt forward of the slots' requests at ``n_loops`` loops, as one batch right-padded to a
        length bucket: the logits (B, vocab) fp32 of each prompt's last token and its ``_results``
        (every row finished at n_loops)."""
        prompts = [self.slots[s].request.prompt for s in slots]
        length = min(self._bucket_len(max(map(len, prompts))), self.max_len)
        rows = self._rows(slots)
        ids = torch.zeros(rows.numel(), length, dtype=torch.long)
        last = torch.zeros(rows.numel(), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.tensor(p)
            last[i] = len(p) - 1
        stage = self._prefill_stages.setdefault(n_loops, lambda r, x, at: self._prefill_stage(r, x, at, n_loops))
        key = ("prefill", rows.numel(), length, n_loops)
        return self._run(stage, key, rows, ids.to(self.device), last.to(self.device))

    @staticmethod
    def _bucket_len(n: int) -> int:
        """Prompt lengths are padded to powers of two (>= 16): a few shapes, each one CUDA graph."""
        return max(16, 1 << (n - 1).bit_length())

    def _prefill_stage(self, rows: torch.Tensor, ids: torch.Tensor, last: torch.Tensor, n_loops: int):
        logits = self.model(ids, n_loops, self.cache.bind_prefill(rows), logits_at=last).float()
        every = torch.ones_like(rows, dtype=torch.bool)
        return logits, self._results(rows, logits, torch.full_like(rows, n_loops), every)

    def _results(self, rows: torch.Tensor, logits: torch.Tensor, depth: torch.Tensor, finish: torch.Tensor):
        """(3, B): greedy token, loops run, finished; the greedy token of each finished row becomes its
        next token (a host-sampled one overwrites it)."""
        greedy = logits.argmax(-1)
        self.next_tok[rows] = torch.where(finish, greedy, self.next_tok[rows])
        self.pending[rows] = self.pending[rows] | finish
        return torch.stack((greedy, depth, finish.long()))

    def _start_stage(self, rows: torch.Tensor) -> None:
        """start: e = Prelude(embed(next token)) at each row's position and a reset loop state, for the
        rows whose next token is pending; the other rows are left unchanged."""
        start, tokens = self.pending[rows], self.next_tok[rows]
        self.pending[rows] = torch.zeros_like(start)
        pos = self.pos[rows]
        self.cache.bind(rows, pos, torch.zeros_like(rows), start)
        rope = self._rope(pos)
        x = self.model.embed(tokens[:, None])
        for i, block in enumerate(self.model.prelude):
            x = block(x, rope, self.cache, ("prelude", i))
        self.e[rows] = _where_rows(start, x[:, 0], self.e[rows])
        self.h[rows] = _where_rows(start, self.model.recurrent.initial_state(x[:, 0]), self.h[rows])
        for buf in (self.mix, self.cum, self.psum, self.t, self.done):
            buf[rows] = buf[rows].masked_fill(_rows_mask(start, buf), 0)

    def _token_stage(self, rows: torch.Tensor, n_loops: int):
        """A whole fixed-depth token: start, n_loops loop stages, finish (static schedule, no exit rule)."""
        self._start_stage(rows)
        for _ in range(n_loops):
            self._loop_stage(rows)
        return self._finish_stage(rows, torch.ones_like(rows, dtype=torch.bool))

    def _depth_stage(self, rows: torch.Tensor, probe: bool, start: bool, finish: bool):
        """A depth tick: start the rows' pending tokens, run ``sync_every`` loop iterations of
        every row at its own depth, finish the rows whose token exited (masks, not row subsets: one
        shape per bucket). ``start`` / ``finish`` False: no row needs that stage in this tick."""
        if start:
            self._start_stage(rows)
        for _ in range(self.sync_every):  # a row that exits is frozen by the loop stage until the finish
            done = (self._loop_stage_probe if probe else self._loop_stage)(rows)
        if finish:
            return (self._finish_stage_probe if probe else self._finish_stage)(rows, done)
        return None

    def _loop_stage_probe(self, rows: torch.Tensor) -> torch.Tensor:
        return self._loop_stage(rows, probe=True)

    def _finish_stage_probe(self, rows: torch.Tensor, finish: torch.Tensor):
        return self._finish_stage(rows, finish, probe=True)

    def _finish_stage(self, rows: torch.Tensor, finish: torch.Tensor, probe: bool = False):
        """(logits (B, vocab) fp32, results (3, B): see ``_results``) of the rows' tokens; moves the
        rows marked in ``finish`` one position on (the others write nothing)."""
        if probe:
            logits = self.logits[rows]
        else:
            logits = self._coda_logits(rows, self.pos[rows], self.out[rows], finish)
        self.pos[rows] = (self.pos[rows] + finish.long()).clamp(max=self.max_len - 1)  # clamp: the padding rows
        return logits, self._results(rows, logits, self.t[rows], finish)

    def _loop_stage(self, rows: torch.Tensor, probe: bool = False) -> torch.Tensor:
        """loop: for ``rows``: one recurrent iteration each at its own depth; returns which
        rows have exited (a row that had exited before stays frozen: no state or cache writes)."""
        rec, cfg = self.model.recurrent, self.cfg
        h, e, t, pos = self.h[rows], self.e[rows], self.t[rows], self.pos[rows]
        running = ~self.done[rows]
        self.cache.bind(rows, pos, t.clamp(max=self.cache.loop_slots - 1), running)
        rope = self._rope(pos)
        ti = t.clamp(max=cfg.max_loop_iters - 1)  # loop embedding / LoRA index (as in RecurrentBlock)
        lora = (rec.lora.down[ti], rec.lora.up[ti]) if rec.lora is not None else None
        h_new = rec.step(h[:, None], e[:, None], rope, self.loop_table[ti][:, None], lora,
                         self.cache, ("recurrent", None))[:, 0]
        depth = t + 1

        p = rec.act.halting_prob(h_new)
        psum = self.psum[rows] + p
        rel = (h_new - h).float().norm(dim=-1) / h_new.float().norm(dim=-1).clamp_min(1e-12)
        exit_now = (psum >= self.act_thr[rows]) | ((t > 0) & (rel < self.rel_tol[rows]))
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

        loop_output="final": the state h. "act": sum_t w_t h_t with the ACT weights of ACTHalting.step
        (w = p while running, the remainder 1 - sum at the halting or final loop, 0 after)."""
        mix, cum = self.mix[rows], self.cum[rows]
        if self.cfg.loop_output != "act":
            return h_new, mix, cum
        running = cum < self.model.recurrent.act.threshold
        halts = running & ((cum + p >= self.model.recurrent.act.threshold) | last)
        w = torch.where(halts, 1.0 - cum, torch.where(running, p, torch.zeros_like(p)))
        mix = mix + w[:, None] * h_new.float()
        return mix.to(h_new.dtype), mix, cum + w

    def _coda_logits(self, rows: torch.Tensor, pos: torch.Tensor, state: torch.Tensor,
                     write: torch.Tensor) -> torch.Tensor:
        """logits = head(norm(Coda(out_norm(state)))) at each row's position; fp32 (B, vocab)."""
        self.cache.bind(rows, pos, torch.zeros_like(rows), write)
        rope = self._rope(pos)
        x = self.model.recurrent.out_norm(state)[:, None]
        for i, block in enumerate(self.model.coda):
            x = block(x, rope, self.cache, ("coda", i))
        return self.model.head(self.model.norm(x))[:, 0].float()

    def _emit(self, slot: int, token: int, depth: int, events: list[TokenEvent],
              logprobs: TokenLogprobs | None = None) -> bool:
        """Record and emit the slot's token; False if it ends the request (the slot is freed)."""
        s = self.slots[slot]
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
            self._release(slot)
        return reason is None


def _token_logprobs(logits: torch.Tensor, token: int, k: int) -> TokenLogprobs:
    """``token``'s log-probability under log_softmax(logits (vocab,)) and the k most likely tokens."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    top = torch.topk(logp, min(k, logp.numel())) if k else None
    pairs = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
    return TokenLogprobs(float(logp[token]), pairs)


def _rows_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-row mask (B,) shaped to broadcast over ``like`` (B, ...)."""
    return mask.view(-1, *[1] * (like.dim() - 1))


def _where_rows(mask: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Row b of ``new`` where mask[b], else of ``old``."""
    return torch.where(_rows_mask(mask, new), new, old)

"""The engine thread: one thread owns the inference engine and steps it; asyncio handlers talk to
it through a lock-free inbox and receive their tokens on an asyncio queue.

    handler: validate, then inbox.put(submit)     engine thread, forever:
    handler <-- asyncio queue ------------------      drain the inbox (submit / cancel)
             loop.call_soon_threadsafe                 events = engine.tick()
                                                       route each event to its request's queue

The event loop never waits for a tick: handlers only validate (pure) and enqueue. Admission
control: at most ``max_pending`` requests (waiting + running) are accepted; beyond that `submit`
raises `QueueFull` (HTTP 429) instead of letting the queue grow without limit.

Failures: the engine ends a request whose own work failed with finish reason "error" and serves the
rest. If a whole tick fails (a bug, out of memory: nothing ties it to one request), the requests in
the engine fail with "error", the traceback is logged, and the engine is emptied and kept serving;
only if that recovery step fails too does the worker stop (``error`` set: /health answers 503).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections import deque

from ..inference import Engine, Request, TokenEvent

logger = logging.getLogger(__name__)
FINISH_REASONS = ("stop", "length", "cancelled", "abort", "error")


class QueueFull(RuntimeError):
    pass


class ShuttingDown(RuntimeError):
    pass


class EngineWorker:
    def __init__(self, engine: Engine, max_pending: int = 256):
        self.engine, self.max_pending = engine, max_pending
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._ids = itertools.count()
        self._counts = threading.Lock()  # guards the counters below; never held during a tick
        self._in_flight = 0
        self.metrics = {"requests_total": 0, "requests_rejected_total": 0, "tokens_total": 0, "depth_sum": 0}
        self.finished = dict.fromkeys(FINISH_REASONS, 0)  # requests ended, by finish reason
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent ticks, for tokens/s
        self._stopping = False
        self.error: BaseException | None = None
        # engine-thread state
        self._routes: dict[int, tuple[int, asyncio.AbstractEventLoop, asyncio.Queue]] = {}  # engine id -> (ticket, ...)
        self._engine_ids: dict[int, int] = {}                                               # ticket -> engine id
        self._thread = threading.Thread(target=self._run, name="mythos-engine", daemon=True)

    def start(self) -> "EngineWorker":
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel whatever is still running and stop the thread."""
        self._stopping = True
        self._inbox.put(("stop",))
        self._wake.set()
        self._thread.join(timeout)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def drain(self) -> None:
        """Accept no new request (they get ShuttingDown); those in flight continue."""
        self._stopping = True

    def abort_all(self) -> None:
        """End every request in flight with finish reason "abort" (the shutdown deadline)."""
        self._stopping = True
        self._inbox.put(("abort",))
        self._wake.set()

    # ------------------------------------------------------------------------------ handler side
    def submit(self, request: Request) -> tuple[int, asyncio.Queue]:
        """Queue a request; returns (ticket, queue of its TokenEvents). Raises ValueError for a bad
        request, QueueFull at capacity, ShuttingDown after stop() or an engine failure."""
        if self.error is not None:
            raise ShuttingDown(f"the engine failed ({self.error!r}); the server is stopping")
        if self._stopping:
            raise ShuttingDown("the server is shutting down")
        self.engine.validate(request)
        with self._counts:
            if self._in_flight >= self.max_pending:
                self.metrics["requests_rejected_total"] += 1
                raise QueueFull(f"the server is at capacity ({self.max_pending} requests in flight); retry later")
            self._in_flight += 1
            self.metrics["requests_total"] += 1
        ticket, events = next(self._ids), asyncio.Queue()
        self._inbox.put(("submit", ticket, request, asyncio.get_running_loop(), events))
        self._wake.set()
        return ticket, events

    def cancel(self, ticket: int, reason: str = "cancelled") -> None:
        self._inbox.put(("cancel", ticket, reason))
        self._wake.set()

    def snapshot(self) -> dict:
        with self._counts:
            now = time.monotonic()
            while self._recent and now - self._recent[0][0] > 10.0:
                self._recent.popleft()
            m = dict(self.metrics, finished=dict(self.finished))
            m["tokens_per_s"] = sum(n for _, n in self._recent) / 10.0
        m["queue_depth"] = len(self.engine.waiting)
        m["running"] = len(self.engine.active)
        m["mean_exit_depth"] = m.pop("depth_sum") / m["tokens_total"] if m["tokens_total"] else 0.0
        return m

    # ------------------------------------------------------------------------------ engine thread
    def _drain_inbox(self) -> bool:
        """Apply queued submits/cancels; False once a stop message has arrived."""
        running = True
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return running
            if msg[0] == "submit":
                _, ticket, request, loop, events = msg
                rid = self.engine.submit(request)  # validated by the handler already
                self._routes[rid] = (ticket, loop, events)
                self._engine_ids[ticket] = rid
            elif msg[0] == "cancel" and msg[1] in self._engine_ids:
                self.engine.cancel(self._engine_ids[msg[1]], msg[2])
            elif msg[0] in ("stop", "abort"):
                running = running and msg[0] == "abort"
                for rid in self._routes:
                    self.engine.cancel(rid, "abort")

    def _run(self) -> None:
        running = True
        while running or self.engine.has_work():
            running = self._drain_inbox() and running
            if not self.engine.has_work():
                if running:
                    self._wake.wait(0.05)
                    self._wake.clear()
                continue
            try:
                events = self.engine.tick()
            except Exception as err:  # a bug or an OOM in a whole tick: fail its requests, keep serving
                events = self._recover(err)
            self._route(events)
            if self.error is not None:
                return

    def _recover(self, err: Exception) -> list[TokenEvent]:
        """After a failed tick: log it, empty the engine (cancel every request and step once) and
        return an "error" event for each request; if that step fails too, the engine is broken:
        set ``error`` (health 503) and stop."""
        logger.error("engine tick failed; failing its %d requests", len(self._routes), exc_info=err)
        for rid in self._routes:
            self.engine.cancel(rid, "error")
        try:
            self.engine.tick()  # applies the cancellations; its events are the ones returned below
            if self.engine.has_work():
                raise RuntimeError("the engine still has work after cancelling every request")
        except Exception as again:
            logger.error("the engine cannot recover; stopping", exc_info=again)
            self.error = again
        return [TokenEvent(rid, None, 0, "error") for rid in self._routes]

    def _route(self, events: list[TokenEvent]) -> None:
        tokens = [ev for ev in events if ev.token is not None]
        finished = 0
        for ev in events:
            ticket, loop, out = self._routes[ev.request_id]
            if ev.finish_reason is not None:
                del self._routes[ev.request_id], self._engine_ids[ticket]
                finished += 1
                with self._counts:
                    self.finished[ev.finish_reason] = self.finished.get(ev.finish_reason, 0) + 1
            loop.call_soon_threadsafe(out.put_nowait, ev)
        with self._counts:
            self._in_flight -= finished
            if tokens:
                self.metrics["tokens_total"] += len(tokens)
                self.metrics["depth_sum"] += sum(ev.depth for ev in tokens)
                self._recent.append((time.monotonic(), len(tokens)))

"""OpenAI-compatible HTTP API on the inference engine (continuous batching; FastAPI).

    POST /v1/completions        {"prompt": str | [token ids], "max_tokens", "temperature", "top_p",
                                 "stop", "seed", "stream", + extensions "top_k", "n_loops", "exit_rule"}
    POST /v1/chat/completions   {"messages": [{"role", "content"}], ... same fields}
    GET  /v1/models, /health, /metrics (Prometheus text)

Extensions: ``n_loops`` (the request's loop budget) and ``exit_rule`` ({"kind": "none" | "act" |
"rel_change" | "kl", "threshold", "min_loops"}); responses carry ``"mythos": {"loop_depths": [...]}``.
Errors use OpenAI's shape {"error": {"message", "type", "param", "code"}}: 400 for a bad request
(malformed JSON, wrong types, prompt too long, bad sampling values), 429 when the queue is full,
503 while shutting down. A streaming client that disconnects has its request cancelled.
"""

from __future__ import annotations

import json
import time
import uuid
from contextlib import asynccontextmanager
from typing import Literal, Optional, Union

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr

from ..inference import Engine, ExitRule, Request, TokenEvent
from ..inference.text import TextStream
from ..sampling import SamplingParams
from .worker import EngineWorker, QueueFull, ShuttingDown


# ---------------------------------------------------------------------------------- schemas
class ExitRuleSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["none", "act", "rel_change", "kl"] = "none"
    threshold: Optional[Union[StrictFloat, StrictInt]] = None
    min_loops: StrictInt = 1


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use
    model: Optional[StrictStr] = None
    max_tokens: Optional[StrictInt] = None
    temperature: Union[StrictFloat, StrictInt] = 1.0
    top_p: Union[StrictFloat, StrictInt] = 1.0
    top_k: StrictInt = 0
    stop: Optional[Union[StrictStr, list[StrictStr]]] = None
    seed: Optional[StrictInt] = None
    stream: bool = False
    n: StrictInt = 1
    n_loops: Optional[StrictInt] = None
    exit_rule: Optional[ExitRuleSpec] = None


class CompletionBody(_Common):
    prompt: Union[StrictStr, list[StrictInt]]


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr


class ChatBody(_Common):
    messages: list[ChatMessage] = Field(min_length=1)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def error_response(status: int, message: str, param: str | None = None,
                   kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status)


# ---------------------------------------------------------------------------------- app
def build_app(engine: Engine, tokenizer, model_name: str = "open-mythos", max_pending: int = 256,
              default_max_tokens: int = 16) -> FastAPI:
    worker = EngineWorker(engine, max_pending)
    cfg = engine.cfg

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        yield
        worker.stop()  # uvicorn has let in-flight responses finish (or cancelled them) by now

    app = FastAPI(title="open-mythos", lifespan=lifespan)
    app.state.worker = worker

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, exc: RequestValidationError):
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            return error_response(400, f"malformed JSON body: {first.get('ctx', {}).get('error', 'cannot parse')}")
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        return error_response(400, f"invalid request: {loc or 'body'}: {first.get('msg')}", loc)

    @app.exception_handler(APIError)
    async def _api_error(_, exc: APIError):
        return error_response(exc.status, exc.message, exc.param, exc.kind)

    def to_request(body: _Common, prompt: list[int], stop_ids: tuple[int, ...]) -> tuple[Request, TextStream]:
        if body.n != 1:
            raise APIError(400, "only n=1 is supported", "n")
        if body.model not in (None, model_name):
            raise APIError(404, f"model {body.model!r} is not served here (this server serves {model_name!r})",
                           "model", "not_found_error")
        context_left = engine.max_len - len(prompt)
        max_tokens = body.max_tokens
        if max_tokens is None:
            max_tokens = max(1, min(default_max_tokens, cfg.max_output_tokens, context_left))
        elif max_tokens > cfg.max_output_tokens:
            raise APIError(400, f"max_tokens={max_tokens} exceeds this model's limit of {cfg.max_output_tokens} "
                                "new tokens (max_output_tokens)", "max_tokens")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        try:
            sampling = SamplingParams(float(body.temperature), body.top_k, float(body.top_p))
            rule = ExitRule(**body.exit_rule.model_dump()) if body.exit_rule else ExitRule()
            stream = TextStream(tokenizer, stop)  # validates the stop strings
        except ValueError as err:
            raise APIError(400, str(err)) from None
        return Request(prompt, max_tokens, body.n_loops, sampling, rule, stop_ids, body.seed), stream

    def submit(request: Request) -> tuple[int, object]:
        try:
            return worker.submit(request)
        except ValueError as err:
            raise APIError(400, str(err)) from None
        except QueueFull as err:
            raise APIError(429, str(err), kind="rate_limit_error") from None
        except ShuttingDown as err:
            raise APIError(503, str(err), kind="server_error") from None

    async def generate(ticket: int, queue, stream: TextStream, stop_ids: tuple[int, ...], depths: list[int]):
        """Yield (text piece, finish reason or None) until the request ends; cancels it if the
        consumer goes away (client disconnect, shutdown)."""
        finished = False
        try:
            while True:
                ev: TokenEvent = await queue.get()
                if ev.token is not None:
                    depths.append(ev.depth)
                if ev.finish_reason == "error":
                    finished = True
                    raise APIError(500, "the engine failed; see the server log", kind="server_error")
                piece, hit_stop = stream.on_event(ev.token, ev.finish_reason is not None, stop_ids)
                if hit_stop:
                    worker.cancel(ticket, "stop")
                if ev.finish_reason is not None:
                    finished = True
                    yield piece, ev.finish_reason
                    return
                if piece:
                    yield piece, None
        finally:
            if not finished:
                worker.cancel(ticket)

    async def run(body: _Common, prompt: list[int], stop_ids: tuple[int, ...], chat: bool):
        request, stream = to_request(body, prompt, stop_ids)
        ticket, queue = submit(request)
        depths: list[int] = []
        created, ident = int(time.time()), f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        obj = "chat.completion" if chat else "text_completion"
        gen = generate(ticket, queue, stream, stop_ids, depths)

        def usage() -> dict:
            return {"prompt_tokens": len(prompt), "completion_tokens": len(depths),
                    "total_tokens": len(prompt) + len(depths)}

        if not body.stream:
            text, reason = "", None
            try:
                async for piece, reason in gen:
                    text += piece
            finally:
                await gen.aclose()
            choice = {"index": 0, "finish_reason": reason}
            choice |= {"message": {"role": "assistant", "content": text}} if chat else {"text": text, "logprobs": None}
            return JSONResponse({"id": ident, "object": obj, "created": created, "model": model_name,
                                 "choices": [choice], "usage": usage(), "mythos": {"loop_depths": depths}})

        async def sse():
            chunk_obj = "chat.completion.chunk" if chat else "text_completion"

            def chunk(piece: str | None, reason: str | None, first: bool = False) -> str:
                if chat:
                    delta = {"role": "assistant", "content": ""} if first else ({"content": piece} if piece else {})
                    choice = {"index": 0, "delta": delta, "finish_reason": reason}
                else:
                    choice = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": reason}
                data = {"id": ident, "object": chunk_obj, "created": created, "model": model_name, "choices": [choice]}
                if reason is not None:
                    data |= {"usage": usage(), "mythos": {"loop_depths": depths}}
                return f"data: {json.dumps(data)}\n\n"

            try:
                if chat:
                    yield chunk(None, None, first=True)
                async for piece, reason in gen:
                    yield chunk(piece, reason)
                yield "data: [DONE]\n\n"
            except APIError as err:
                yield f"data: {json.dumps({'error': {'message': err.message, 'type': err.kind}})}\n\n"
            finally:
                await gen.aclose()  # a disconnect lands here: the request is cancelled

        return StreamingResponse(sse(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        prompt = tokenizer.encode(body.prompt) if isinstance(body.prompt, str) else body.prompt
        return await run(body, prompt, (tokenizer.eos_token_id,), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody):
        prompt = tokenizer.apply_chat_template([m.model_dump() for m in body.messages])
        return await run(body, prompt, tuple(tokenizer.chat_stop_token_ids), chat=True)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "open-mythos", "max_model_len": engine.max_len,
                                            "max_loops": engine.max_loops}]}

    @app.get("/health")
    async def health():
        if worker.error is not None:
            return error_response(503, f"engine failed: {worker.error!r}", kind="server_error")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        m = worker.snapshot()
        lines = []
        for name, help_ in (("requests_total", "requests accepted"), ("requests_rejected_total", "requests refused (429)"),
                            ("tokens_total", "tokens generated"), ("queue_depth", "requests waiting for a slot"),
                            ("running", "requests holding a slot (running or prefilled on standby)"), ("tokens_per_s", "tokens/s over the last 10 s"),
                            ("mean_exit_depth", "mean loops per generated token")):
            lines += [f"# HELP mythos_{name} {help_}", f"mythos_{name} {m[name]}"]
        return PlainTextResponse("\n".join(lines) + "\n")

    return app


def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0, **uvicorn_kwargs):
    """Run ``app`` with uvicorn in a background thread (notebooks, tests, benchmarks); port 0 picks a
    free one. Returns (server, base URL); stop with ``server.should_exit = True``."""
    import socket
    import threading

    import uvicorn

    if port == 0:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", **uvicorn_kwargs))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    server.thread = thread
    return server, f"http://{host}:{port}"

"""OpenAI-compatible HTTP API on the inference engine (continuous batching; FastAPI).

    POST /v1/completions        {"prompt": str | [token ids], "max_tokens", "temperature", "top_p",
                                 "stop", "seed", "stream", "logprobs", + extensions "top_k", "n_loops",
                                 "exit_rule"}
    POST /v1/chat/completions   {"messages": [{"role", "content"}], "max_completion_tokens",
                                 "logprobs", "top_logprobs", ... the same fields}
    GET  /v1/models, /health, /metrics (Prometheus text)

Extensions: ``n_loops`` (the request's loop budget) and ``exit_rule`` ({"kind": "none" | "act" |
"rel_change" | "kl", "threshold", "min_loops"}); responses carry ``"mythos": {"loop_depths": [...]}``.
What a body may hold is `schemas.py`; fields this server does not implement are refused, not ignored.

Every error has OpenAI's shape {"error": {"message", "type", "param", "code"}}: 400 for a bad
request (malformed JSON, wrong types or values, prompt too long, unsupported field; ``param`` names
the field), 404 / 405 for an unknown route or method, 413 for a body over ``max_body_bytes``, 429
when the queue is full, 500 when the engine failed on the request (the traceback is in the server
log), 503 while shutting down. Work is bounded before it starts: the body size first, then a prompt
length check that needs no tokenizer, then tokenisation, off the event loop. A client that
disconnects, streaming or not, has its request cancelled. On shutdown (`make_server`) requests still
running after the drain timeout end with finish reason "abort" (and a stream with its final chunk
and ``[DONE]``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from ..inference import Engine, ExitRule, Request, TokenEvent
from ..inference.text import TextStream
from ..sampling import SamplingParams
from ..tokenizer import check_vocab_covered
from .schemas import BadBody, ChatBody, CompletionBody, _Common, parse_body
from .worker import EngineWorker, QueueFull, ShuttingDown

logger = logging.getLogger(__name__)
DEFAULT_MAX_BODY_BYTES = 8 * 2 ** 20


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def error_body(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> dict:
    # messages may quote client input: a lone surrogate in one must not break the encoding of the answer
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    param = None if param is None else param.encode("utf-8", "backslashreplace").decode("utf-8")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def error_response(status: int, message: str, param: str | None = None,
                   kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(error_body(status, message, param, kind), status)


_HTTP_KINDS = {404: "not_found_error", 413: "invalid_request_error"}


# ---------------------------------------------------------------------------------- app
def build_app(engine: Engine, tokenizer, model_name: str = "open-mythos", max_pending: int = 256,
              default_max_tokens: int = 16, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """The FastAPI app serving ``engine``. Raises ValueError if the model's vocabulary exceeds the
    tokenizer's (ids it cannot decode). ``max_body_bytes``: larger request bodies get 413."""
    check_vocab_covered(engine.cfg.vocab_size, tokenizer)
    worker = EngineWorker(engine, max_pending)
    cfg = engine.cfg
    # a prompt of more characters than this has at least max_len tokens: too long, known untokenised
    max_token_bytes = getattr(tokenizer, "max_token_bytes", None)
    max_prompt_chars = None if max_token_bytes is None else (engine.max_len - 1) * max_token_bytes

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        yield
        worker.stop()  # uvicorn has let in-flight responses finish (or cancelled them) by now

    app = FastAPI(title="open-mythos", lifespan=lifespan)
    app.state.worker = worker

    @app.exception_handler(APIError)
    async def _api_error(_, exc: APIError):
        return error_response(exc.status, exc.message, exc.param, exc.kind)

    @app.exception_handler(HTTPException)
    async def _http_error(_, exc: HTTPException):  # unknown route (404), wrong method (405), ...
        return error_response(exc.status_code, str(exc.detail), None, _HTTP_KINDS.get(exc.status_code,
                                                                                      "invalid_request_error"))

    @app.exception_handler(Exception)
    async def _unexpected(_, exc: Exception):  # a bug: uvicorn logs the traceback
        return error_response(500, f"internal error ({type(exc).__name__}); see the server log", None, "server_error")

    async def read_body(request: HTTPRequest) -> bytes:
        """The request body, refused with 413 as soon as it is known to exceed ``max_body_bytes``."""
        declared = request.headers.get("content-length", "")
        too_big = APIError(413, f"request body exceeds the limit of {max_body_bytes} bytes", None)
        if declared.isdigit() and (len(declared) > 18 or int(declared) > max_body_bytes):
            raise too_big
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > max_body_bytes:
                    raise too_big
        except ClientDisconnect:
            raise APIError(400, "the client disconnected while sending the body") from None
        return bytes(body)

    def check_length(chars: int) -> None:
        if max_prompt_chars is not None and chars > max_prompt_chars:
            raise APIError(400, f"prompt of {chars} characters is too long: the context holds {engine.max_len} "
                                f"tokens (at most {max_token_bytes} bytes each)", "prompt")

    def parse_completion(raw: bytes) -> tuple[CompletionBody, list[int]]:
        body = parse_body(raw, CompletionBody)
        if isinstance(body.prompt, str):
            check_length(len(body.prompt))
            return body, tokenizer.encode(body.prompt)
        return body, body.prompt  # its length and ids: the engine's checks (Engine.validate, on submit)

    def parse_chat(raw: bytes) -> tuple[ChatBody, list[int]]:
        body = parse_body(raw, ChatBody)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        check_length(sum(len(m["content"]) for m in messages))
        return body, tokenizer.apply_chat_template(messages)

    async def parse(request: HTTPRequest, parser):
        """Read, validate and tokenise off the event loop (a long prompt takes a while to tokenise)."""
        raw = await read_body(request)
        try:
            return await run_in_threadpool(parser, raw)
        except (BadBody, ValueError) as err:
            raise APIError(400, getattr(err, "message", str(err)), getattr(err, "param", None)) from None

    def to_request(body: _Common, prompt: list[int], stop_ids: tuple[int, ...]) -> tuple[Request, TextStream]:
        if body.n != 1:
            raise APIError(400, "only n=1 is supported", "n")
        if body.model not in (None, model_name):
            raise APIError(404, f"model {body.model!r} is not served here (this server serves {model_name!r})",
                           "model", "not_found_error")
        field = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) is not None else "max_tokens"
        try:
            max_tokens = body.new_tokens()
            logprobs = body.top_logprobs_count()
        except BadBody as err:
            raise APIError(400, err.message, err.param) from None
        if max_tokens is None:
            max_tokens = max(1, min(default_max_tokens, cfg.max_output_tokens, engine.max_len - len(prompt)))
        elif max_tokens > cfg.max_output_tokens:
            raise APIError(400, f"{field}={max_tokens} exceeds this model's limit of {cfg.max_output_tokens} "
                                "new tokens (max_output_tokens)", field)
        sampling = SamplingParams(body.temperature, body.top_k, body.top_p)  # in range: the schema's bounds
        try:
            rule = ExitRule(**body.exit_rule.model_dump()) if body.exit_rule else ExitRule()
        except ValueError as err:  # e.g. an "act" threshold above 1
            raise APIError(400, str(err), "exit_rule") from None
        request = Request(prompt, max_tokens, body.n_loops, sampling, rule, stop_ids, body.seed, logprobs)
        return request, TextStream(tokenizer, body.stop or [])

    def submit(request: Request) -> tuple[int, asyncio.Queue]:
        try:
            return worker.submit(request)
        except ValueError as err:
            raise APIError(400, str(err), _param_of(str(err))) from None
        except QueueFull as err:
            raise APIError(429, str(err), kind="rate_limit_error") from None
        except ShuttingDown as err:
            raise APIError(503, str(err), kind="server_error") from None

    async def generate(ticket: int, queue: asyncio.Queue, stream: TextStream, stop_ids: tuple[int, ...],
                       tokens: list[TokenEvent]):
        """Yield (text piece, finish reason or None) until the request ends, appending each token of
        the completion to ``tokens``; cancels the request if the consumer goes away (client
        disconnect, shutdown). The reason is "stop" whenever the text ended at a stop string, even if
        the token that completed it was also the last one allowed ("length")."""
        finished = False
        try:
            while True:
                ev: TokenEvent = await queue.get()
                if ev.finish_reason == "error":
                    finished = True
                    raise APIError(500, "the engine failed on this request; see the server log", kind="server_error")
                if ev.token is not None and not stream.stopped:  # tokens after a stop string are not the answer's
                    tokens.append(ev)
                piece = stream.on_event(ev, stop_ids, lambda: worker.cancel(ticket, "stop"))
                if ev.finish_reason is not None:
                    finished = True
                    yield piece, "stop" if stream.stopped else ev.finish_reason
                    return
                yield piece, None
        finally:
            if not finished:
                worker.cancel(ticket)

    def logprobs_of(events: list[TokenEvent], chat: bool, stop_ids: tuple[int, ...], offset: int) -> dict | None:
        """OpenAI's logprobs object for ``events`` (end-of-sequence tokens left out); ``offset``: the
        text offset (characters) of the first one (completions)."""
        events = [ev for ev in events if ev.logprobs is not None and ev.token not in stop_ids]
        if chat:
            return {"content": [{**_token_entry(tokenizer, ev.token, ev.logprobs.logprob),
                                 "top_logprobs": [_token_entry(tokenizer, t, lp) for t, lp in ev.logprobs.top]}
                                for ev in events], "refusal": None}
        offsets = []
        for ev in events:
            offsets.append(offset)
            offset += len(tokenizer.decode([ev.token]))
        return {"tokens": [_token_text(tokenizer, ev.token) for ev in events],
                "token_logprobs": [ev.logprobs.logprob for ev in events],
                "top_logprobs": [{_token_text(tokenizer, t): lp for t, lp in ev.logprobs.top} for ev in events],
                "text_offset": offsets}

    async def run(http: HTTPRequest, body: _Common, prompt: list[int], stop_ids: tuple[int, ...], chat: bool):
        request, stream = to_request(body, prompt, stop_ids)
        ticket, queue = submit(request)
        tokens: list[TokenEvent] = []
        created, ident = int(time.time()), f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        obj = "chat.completion" if chat else "text_completion"
        gen = generate(ticket, queue, stream, stop_ids, tokens)
        want_logprobs = request.logprobs is not None

        def usage() -> dict:
            return {"prompt_tokens": len(prompt), "completion_tokens": len(tokens),
                    "total_tokens": len(prompt) + len(tokens)}

        def mythos() -> dict:
            return {"loop_depths": [ev.depth for ev in tokens]}

        if not body.stream:
            text, reason = "", None

            async def collect():
                nonlocal text, reason
                try:
                    async for piece, reason in gen:
                        text += piece
                finally:
                    await gen.aclose()

            await _unless_disconnected(http, collect())  # a disconnect cancels the request (gen's finally)
            choice = {"index": 0, "finish_reason": reason,
                      "logprobs": logprobs_of(tokens, chat, stop_ids, 0) if want_logprobs else None}
            choice |= {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
            return JSONResponse({"id": ident, "object": obj, "created": created, "model": model_name,
                                 "choices": [choice], "usage": usage(), "mythos": mythos()})

        include_usage = body.stream_options is not None and body.stream_options.include_usage

        async def sse():
            chunk_obj = "chat.completion.chunk" if chat else "text_completion"
            sent, offset = 0, 0  # tokens whose logprobs were sent; characters of text sent

            def chunk(piece: str | None, reason: str | None, first: bool = False) -> str:
                nonlocal sent, offset
                logprobs = None
                if want_logprobs and not first:
                    logprobs = logprobs_of(tokens[sent:], chat, stop_ids, offset)
                    sent = len(tokens)
                if chat:
                    delta = {"role": "assistant", "content": ""} if first else ({"content": piece} if piece else {})
                    choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
                else:
                    choice = {"index": 0, "text": piece or "", "logprobs": logprobs, "finish_reason": reason}
                offset += len(piece or "")
                data = {"id": ident, "object": chunk_obj, "created": created, "model": model_name, "choices": [choice]}
                if reason is not None:
                    data |= {"usage": usage(), "mythos": mythos()}
                return f"data: {json.dumps(data)}\n\n"

            try:
                if chat:
                    yield chunk(None, None, first=True)
                async for piece, reason in gen:
                    if piece or reason is not None or (want_logprobs and len(tokens) > sent):
                        yield chunk(piece, reason)
                if include_usage:  # OpenAI's usage chunk: no choices
                    chunk = {'id': ident, 'object': chunk_obj, 'created': created, 'model': model_name, 'choices': [],
                             'usage': usage()}
                    yield f"data: {json.dumps(chunk)}\n\n"
                yield "data: [DONE]\n\n"
            except APIError as err:
                yield f"data: {json.dumps(error_body(err.status, err.message, err.param, err.kind))}\n\n"
            except Exception as err:  # a bug, after the headers went out: the stream still ends in OpenAI's shape
                logger.error("stream %s failed", ident, exc_info=err)
                error = error_body(500, 'internal error; see the server log', None, 'server_error')
                yield f"data: {json.dumps(error)}\n\n"
            finally:
                await gen.aclose()  # a disconnect lands here: the request is cancelled

        return StreamingResponse(sse(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest):
        body, prompt = await parse(http, parse_completion)
        return await run(http, body, prompt, (tokenizer.eos_token_id,), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HTTPRequest):
        body, prompt = await parse(http, parse_chat)
        return await run(http, body, prompt, tuple(tokenizer.chat_stop_token_ids), chat=True)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "open-mythos", "max_model_len": engine.max_len,
                                            "max_loops": engine.max_loop_budget}]}

    @app.get("/health")
    async def health():
        if worker.error is not None:
            return error_response(503, f"engine failed: {worker.error!r}", kind="server_error")
        if not worker.alive():
            return error_response(503, "the engine is not running", kind="server_error")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        m = worker.snapshot()
        lines = []
        for name, help_ in (("requests_total", "requests accepted"),
                            ("requests_rejected_total", "requests refused (429)"),
                            ("tokens_total", "tokens generated"), ("queue_depth", "requests waiting for a row"),
                            ("running", "requests holding a row (running or prefilled on standby)"),
                            ("tokens_per_s", "tokens/s over the last 10 s"),
                            ("mean_exit_depth", "mean loops per generated token")):
            lines += [f"# HELP mythos_{name} {help_}", f"mythos_{name} {m[name]}"]
        lines.append("# HELP mythos_requests_finished_total requests ended, by finish reason (error: the engine "
                     "failed on it; cancelled: the client went away)")
        lines += [f'mythos_requests_finished_total{{reason="{r}"}} {n}' for r, n in m["finished"].items()]
        return PlainTextResponse("\n".join(lines) + "\n")

    return app


async def _unless_disconnected(http: HTTPRequest, work) -> None:
    """Await ``work`` (a coroutine); if the client disconnects first, cancel it."""
    task = asyncio.ensure_future(work)

    async def disconnected():
        while (await http.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (task, watch):
            if not t.done():
                t.cancel()
    if not task.done() or task.cancelled():
        raise APIError(499, "the client disconnected")  # never sent: nobody listens
    task.result()


def _param_of(message: str) -> str | None:
    """The request field an engine validation message names (it starts with it)."""
    head = message.split(" ", 1)[0].split("=", 1)[0].rstrip(":")
    return {"max_new_tokens": "max_tokens", "exit_rule": "exit_rule", "prompt": "prompt", "token": "prompt",
            "n_loops": "n_loops", "seed": "seed", "logprobs": "logprobs"}.get(head)


def _token_text(tokenizer, token: int) -> str:
    """A token's text; OpenAI's ``bytes:\\x..`` form for a token that is not whole UTF-8 characters."""
    raw = tokenizer.token_bytes(token)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def _token_entry(tokenizer, token: int, logprob: float) -> dict:
    return {"token": _token_text(tokenizer, token), "logprob": logprob, "bytes": list(tokenizer.token_bytes(token))}


def make_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, drain_timeout: float = 30.0,
                **uvicorn_kwargs):
    """A uvicorn server for ``app`` with a drain deadline: on shutdown it stops accepting requests,
    lets those in flight run for ``drain_timeout`` seconds, then ends the rest with finish reason
    "abort" (a stream gets its final chunk and ``[DONE]``); uvicorn's own graceful timeout (5 s later)
    only cuts what still hangs after that."""
    import uvicorn

    worker: EngineWorker = app.state.worker

    class DrainingServer(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            worker.drain()
            deadline = asyncio.get_running_loop().call_later(drain_timeout, worker.abort_all)
            try:
                await super().shutdown(sockets)
            finally:
                deadline.cancel()

    config = uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=int(drain_timeout) + 5,
                            **uvicorn_kwargs)
    return DrainingServer(config)


def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0, drain_timeout: float = 10.0,
                    **uvicorn_kwargs):
    """Run ``app`` (see `make_server`) in a background thread (notebooks, tests, benchmarks); port 0
    picks a free one. Returns (server, base URL); stop with ``server.should_exit = True``."""
    import socket
    import threading

    if port == 0:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    server = make_server(app, host, port, drain_timeout, log_level="warning", **uvicorn_kwargs)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    server.thread = thread
    return server, f"http://{host}:{port}"

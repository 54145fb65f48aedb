"""`mythos serve`: the real server on 127.0.0.1, spoken to with httpx and the openai client."""

import concurrent.futures
import json
import time

import httpx
import pytest
import torch
from openai import OpenAI

from open_mythos import OpenMythos
from open_mythos.cli import demo_config
from open_mythos.inference import Engine, ExitRule, Request
from open_mythos.inference.text import TextStream
from open_mythos.sampling import SamplingParams
from open_mythos.serving import build_app, serve_in_thread
from open_mythos.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


class LiveServer:
    def __init__(self, model, max_pending=256, max_batch=8, engine_cls=Engine, drain_timeout=10.0, tokenizer=TOK,
                 **app_kwargs):
        self.app = build_app(engine_cls(model, max_batch=max_batch), tokenizer, "tiny", max_pending=max_pending,
                             **app_kwargs)
        self.server, self.url = serve_in_thread(self.app, drain_timeout=drain_timeout)
        self.thread = self.server.thread

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return OpenMythos(demo_config()).eval()


@pytest.fixture(scope="module")
def server(model):
    live = LiveServer(model)
    yield live
    live.stop()


def alone(model, prompt: str, max_tokens: int, **kw) -> tuple[str, str]:
    """What the engine produces for one request on its own, as text."""
    stop = kw.pop("stop", [])
    out = Engine(model, max_batch=1).run([Request(TOK.encode(prompt), max_tokens, eos_token_ids=(TOK.eos_token_id,),
                                                  **kw)])[0]
    stream = TextStream(TOK, stop)
    text = "".join(stream.push(t) for t in out.tokens if t != TOK.eos_token_id)
    if stream.stopped:
        return text + stream.flush(), "stop"
    return text + stream.flush(), out.finish_reason


def sse_events(lines) -> list:
    events = []
    for line in lines:
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def test_health_models_and_openai_client(server, model):
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"] == "tiny"
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    greedy = SamplingParams(temperature=0)
    c = client.completions.create(model="tiny", prompt="To be", max_tokens=12, temperature=0)
    assert (c.choices[0].text, c.choices[0].finish_reason) == alone(model, "To be", 12, sampling=greedy)
    assert c.usage.completion_tokens == 12
    chunks = list(client.completions.create(model="tiny", prompt="To be", max_tokens=12, temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == c.choices[0].text
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                          temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 6
    streamed = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=6, temperature=0, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed) == chat.choices[0].message.content
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello"}],
                                           max_tokens=5, extra_body={"n_loops": 2})  # as in the README
    depths = reply.model_extra["mythos"]["loop_depths"]
    assert depths == [2] * reply.usage.completion_tokens


def test_extensions_loop_budget_exit_rule_and_stop(server, model):
    body = {"prompt": "Hello", "max_tokens": 10, "temperature": 0, "n_loops": 2,
            "exit_rule": {"kind": "kl", "threshold": 1e-3}}
    r = httpx.post(f"{server.url}/v1/completions", json=body).json()
    assert all(1 <= d <= 2 for d in r["mythos"]["loop_depths"])
    expected = alone(model, "Hello", 10, n_loops=2, sampling=SamplingParams(temperature=0),
                     exit_rule=ExitRule("kl", 1e-3))
    assert (r["choices"][0]["text"], r["choices"][0]["finish_reason"]) == expected
    text = expected[0]
    stop = text[3:5]  # a stop string that occurs in the output
    r = httpx.post(f"{server.url}/v1/completions", json=body | {"stop": [stop]}).json()
    assert r["choices"][0]["text"] == text[: text.index(stop)] and r["choices"][0]["finish_reason"] == "stop"


def test_fifty_concurrent_streams_equal_running_each_alone(server, model):
    prompts = [f"Line {i}: " + "abc"[: i % 4] for i in range(50)]

    def body(i):
        return {"prompt": prompts[i], "max_tokens": 4 + i % 7, "stream": True, "n_loops": 1 + i % 4,
                "temperature": 0 if i % 2 else 0.9, "seed": i, "top_k": 20}

    def call(i):
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body(i), timeout=60) as resp:
            events = sse_events(resp.iter_lines())
        assert events[-1] == "[DONE]"
        return "".join(e["choices"][0]["text"] for e in events[:-1]), events[-2]["choices"][0]["finish_reason"]

    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        got = list(pool.map(call, range(50)))
    for i, answer in enumerate(got):
        b = body(i)
        assert answer == alone(model, prompts[i], b["max_tokens"], n_loops=b["n_loops"], seed=i,
                               sampling=SamplingParams(b["temperature"], 20))


def _metrics(server) -> dict:
    text = httpx.get(f"{server.url}/metrics").text
    return {ln.split()[0]: float(ln.split()[1]) for ln in text.splitlines() if ln and not ln.startswith("#")}


def test_disconnect_mid_stream_frees_the_slot(server):
    with httpx.stream("POST", f"{server.url}/v1/completions",
                      json={"prompt": "x", "max_tokens": 60, "stream": True, "n_loops": 4}) as resp:
        next(resp.iter_lines())  # one chunk, then hang up
    deadline = time.time() + 20
    while _metrics(server)["mythos_running"] > 0:
        assert time.time() < deadline, "the disconnected request kept its slot"
        time.sleep(0.05)
    assert httpx.get(f"{server.url}/health").status_code == 200


@pytest.mark.parametrize("body, status, message", [
    ('{"prompt": "x",', 400, "malformed JSON"),
    ({"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ({"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": "x" * 300}, 400, "too long"),
    ({"prompt": "x", "max_tokens": 1000}, 400, "max_tokens=1000 exceeds"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": ""}, 400, "empty"),
    ({"prompt": [1, 2, 999]}, 400, "out of range"),
    ({"prompt": "x", "n_loops": 99}, 400, "n_loops"),
    ({"prompt": "x", "exit_rule": {"kind": "entropy"}}, 400, "exit_rule"),
    ({"prompt": "x", "stop": [""]}, 400, "stop strings"),
    ({"prompt": "x", "n": 2}, 400, "n=1"),
    ({"prompt": "x", "model": "gpt-9"}, 404, "not served"),
    ({"messages": []}, 400, "messages"),
])
def test_bad_requests_get_clear_4xx_and_the_server_keeps_serving(server, body, status, message):
    url = f"{server.url}/v1/chat/completions" if isinstance(body, dict) and "messages" in body \
        else f"{server.url}/v1/completions"
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, str) \
        else {"json": body}
    r = httpx.post(url, **kwargs)
    assert r.status_code == status
    assert message in r.json()["error"]["message"]
    assert httpx.post(f"{server.url}/v1/completions", json={"prompt": "ok", "max_tokens": 2}).status_code == 200


class SlowEngine(Engine):
    """20 ms per tick, so that requests are reliably still in flight while the test acts."""

    def tick(self):
        time.sleep(0.02)
        return super().tick()


def test_full_queue_answers_429_and_shutdown_finishes_in_flight_work(model):
    live = LiveServer(model, max_pending=2, max_batch=1, engine_cls=SlowEngine)
    try:
        body = {"prompt": "x", "max_tokens": 20, "stream": True, "n_loops": 4}
        with httpx.stream("POST", f"{live.url}/v1/completions", json=body, timeout=60) as first, \
                httpx.stream("POST", f"{live.url}/v1/completions", json=body, timeout=60) as second:
            first_lines = first.iter_lines()
            head = sse_events([next(first_lines)])
            r = httpx.post(f"{live.url}/v1/completions", json={"prompt": "y", "max_tokens": 2})
            assert r.status_code == 429 and "capacity" in r.json()["error"]["message"]
            assert _metrics(live)["mythos_requests_rejected_total"] == 1
            live.server.should_exit = True  # graceful shutdown while both streams are in flight
            events = head + sse_events(first_lines) + sse_events(second.iter_lines())
        assert events.count("[DONE]") == 2
        reasons = [e["choices"][0]["finish_reason"] for e in events
                   if e != "[DONE]" and e["choices"][0]["finish_reason"]]
        assert reasons == ["length", "length"]  # in-flight work was finished, not dropped
        live.thread.join(30)
        assert not live.thread.is_alive()
    finally:
        live.stop()

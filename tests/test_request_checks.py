"""One set of request checks: ``OpenMythos.generate``, the inference engine's ``Request`` and the server
reject the same bad value with the same message, naming the argument (checks.py, SamplingParams)."""

import pytest
import torch
from conftest import tiny_config

from open_mythos import OpenMythos
from open_mythos.inference import Engine, Request
from open_mythos.sampling import SamplingParams
from open_mythos.serving import build_app
from open_mythos.tokenizer import ByteTokenizer

# tiny_config: vocab_size 97, max_seq_len 64, max_output_tokens 32
BAD = {  # name: (prompt, generation keyword arguments, the argument the message must name)
    "token id too large": ([1, 97], {}, "prompt"),
    "token id negative": ([1, -1], {}, "prompt"),
    "prompt fills the context": ([1] * 64, {}, "prompt"),
    "prompt + new tokens too long": ([1] * 40, {"max_new_tokens": 30}, "max_new_tokens"),
    "max_new_tokens 0": ([1], {"max_new_tokens": 0}, "max_new_tokens"),
    "max_new_tokens > max_output_tokens": ([1], {"max_new_tokens": 33}, "max_new_tokens"),
    "max_new_tokens float": ([1], {"max_new_tokens": 2.0}, "max_new_tokens"),
    "max_new_tokens bool": ([1], {"max_new_tokens": True}, "max_new_tokens"),
    "n_loops str": ([1], {"n_loops": "2"}, "n_loops"),
    "n_loops bool": ([1], {"n_loops": True}, "n_loops"),
    "eos id too large": ([1], {"eos_token_id": 97}, "eos_token_id"),
    "eos id bool": ([1], {"eos_token_id": True}, "eos_token_id"),
    "seed too large": ([1], {"seed": 2 ** 64}, "seed"),
    "seed too small": ([1], {"seed": -2 ** 63 - 1}, "seed"),
    "seed str": ([1], {"seed": "7"}, "seed"),
    "temperature negative": ([1], {"temperature": -1.0}, "temperature"),
    "temperature str": ([1], {"temperature": "hot"}, "temperature"),
    "temperature nan": ([1], {"temperature": float("nan")}, "temperature"),
    "top_k negative": ([1], {"top_k": -3}, "top_k"),
    "top_k float": ([1], {"top_k": 2.5}, "top_k"),
    "top_p 0": ([1], {"top_p": 0.0}, "top_p"),
    "top_p above 1": ([1], {"top_p": 1.5}, "top_p"),
}
SAMPLING = ("temperature", "top_k", "top_p")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return OpenMythos(tiny_config()).eval()


def generate_error(model, prompt, kwargs) -> str:
    kwargs = {"max_new_tokens": 2, **kwargs}
    with pytest.raises(ValueError) as err:
        model.generate(torch.tensor([prompt]), **kwargs)
    return str(err.value).replace("input_ids", "prompt")  # the prompt's name in each API


def engine_error(engine, prompt, kwargs) -> str:
    kwargs = {"max_new_tokens": 2, **kwargs}
    sampling = {k: kwargs.pop(k) for k in SAMPLING if k in kwargs}
    eos = kwargs.pop("eos_token_id", None)
    with pytest.raises(ValueError) as err:
        engine.submit(Request(prompt, sampling=SamplingParams(**sampling),
                              eos_token_ids=() if eos is None else (eos,), **kwargs))
    return str(err.value).replace("eos_token_ids[0]", "eos_token_id")  # a list of them in a Request


@pytest.mark.parametrize("case", sorted(BAD))
def test_generate_and_the_engine_give_the_same_error_for_the_same_bad_value(model, case):
    prompt, kwargs, argument = BAD[case]
    engine = Engine(model, max_batch=2)
    from_generate, from_engine = generate_error(model, prompt, kwargs), engine_error(engine, prompt, kwargs)
    assert from_generate == from_engine
    assert argument in from_engine
    assert not engine.has_work()


def test_seeds_generate_and_the_engine_accept_are_the_same(model):
    """The whole range torch.Generator.manual_seed takes, negative seeds included, in both."""
    for seed in (-2 ** 63, -1, 2 ** 64 - 1):
        out = model.generate(torch.tensor([[1, 2]]), 2, seed=seed)
        assert out.shape == (1, 4)
        Engine(model).validate(Request([1, 2], 2, seed=seed))


def test_the_server_names_the_field_of_an_engine_check(model):
    """A token-list prompt reaches the engine's checks unchanged: the server answers 400 with the engine's
    message, ``param`` naming the field."""
    from starlette.testclient import TestClient

    engine = Engine(model, max_batch=1)
    app = build_app(engine, ByteTokenizer(), "tiny")
    with TestClient(app) as client:
        for prompt in ([1, 97], [1] * 64):
            r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2})
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["param"] == "prompt"
            assert err["message"] == engine_error(engine, prompt, {})

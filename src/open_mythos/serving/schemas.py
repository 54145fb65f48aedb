"""Request bodies of the OpenAI-compatible API: what a request may hold, bounded before any work.

Bodies are parsed and validated in one pass by pydantic (`parse_body`) in strict JSON mode:
non-finite numbers (``Infinity``, ``NaN``, ``1e999``), numbers past 4,300 digits, nesting deeper than
200, lone UTF-16 surrogates, unknown fields and wrong types are refused with a message naming the
field (`BadBody`). Numbers are bounded here to what the engine accepts (the bounds that depend on the
served model — ``max_tokens``, ``n_loops``, ``exit_rule.min_loops``, token ids, prompt length — are
the engine's `validate`). OpenAI fields this server does not implement are accepted only with their
no-op value (``"echo": false``, ``"logit_bias": {}``...): any other value is refused as "not
supported", never silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from ..checks import SEED_RANGE
from ..inference.exit import EXIT_KINDS
from ..inference.requests import MAX_LOGPROBS

MAX_STOP_STRINGS = 16     # stop strings per request (each is searched for at every token)
MAX_STOP_CHARS = 1024     # characters per stop string

# finite JSON numbers (ints are taken as floats; strict: no strings, no booleans)
Float = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Int = Annotated[int, Field(strict=True)]


def _stop_list(stop: Union[str, list[str], None]) -> list[str]:
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not s for s in stop):
        raise ValueError("stop strings must be non-empty strings")
    if len(stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in stop):
        raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings of at most {MAX_STOP_CHARS} characters each")
    return stop


class ExitRuleSpec(BaseModel):
    """The ``exit_rule`` extension (inference.ExitRule); min_loops <= max_loops is the engine's check."""
    model_config = ConfigDict(extra="forbid", strict=True)
    kind: Literal[EXIT_KINDS] = "none"
    threshold: Optional[Annotated[Float, Field(gt=0)]] = None
    min_loops: Annotated[Int, Field(ge=1)] = 1


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    # OpenAI fields not implemented here -> the values that mean "off" (accepted, as they are honoured)
    NOT_SUPPORTED: ClassVar[dict[str, tuple]] = {"logit_bias": (None, {}), "presence_penalty": (None, 0),
                                                 "frequency_penalty": (None, 0)}

    model: Optional[str] = None
    max_tokens: Optional[Annotated[Int, Field(ge=1)]] = None
    temperature: Annotated[Float, Field(ge=0)] = 1.0
    top_p: Annotated[Float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[Int, Field(ge=0)] = 0
    stop: Annotated[Optional[Union[str, list[str]]], AfterValidator(_stop_list)] = None
    seed: Optional[Annotated[Int, Field(ge=SEED_RANGE[0], le=SEED_RANGE[1])]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: Annotated[Int, Field(ge=1)] = 1
    user: Optional[str] = None  # an end-user id for the caller's own records; changes nothing
    # extensions
    n_loops: Optional[Annotated[Int, Field(ge=1)]] = None
    exit_rule: Optional[ExitRuleSpec] = None
    # not supported (see NOT_SUPPORTED)
    logit_bias: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None

    def unsupported(self) -> str | None:
        """The first field set to a value this server does not implement, or None."""
        return next((name for name, off in self.NOT_SUPPORTED.items()
                     if name in self.model_fields_set and not any(_same(getattr(self, name), v) for v in off)),
                    None)

    def new_tokens(self) -> int | None:
        return self.max_tokens


class CompletionBody(_Common):
    NOT_SUPPORTED: ClassVar[dict[str, tuple]] = _Common.NOT_SUPPORTED | {"echo": (False,), "best_of": (None, 1),
                                                                         "suffix": (None, "")}

    prompt: Union[str, list[Int]]
    logprobs: Optional[Annotated[Int, Field(ge=0, le=MAX_LOGPROBS)]] = None  # alternatives per token
    echo: Any = None
    best_of: Any = None
    suffix: Any = None

    def top_logprobs_count(self) -> int | None:
        return self.logprobs


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, Annotated[list[TextPart], Field(min_length=1)]]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatBody(_Common):
    NOT_SUPPORTED: ClassVar[dict[str, tuple]] = _Common.NOT_SUPPORTED | {
        "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
        "parallel_tool_calls": (None, False, True), "response_format": (None, {"type": "text"}),
        "store": (None, False), "metadata": (None, {}), "service_tier": (None, "auto", "default"),
        "modalities": (None, ["text"]), "audio": (None,), "prediction": (None,), "reasoning_effort": (None,),
        "web_search_options": (None,)}

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Optional[Annotated[Int, Field(ge=1)]] = None
    logprobs: bool = False
    top_logprobs: Optional[Annotated[Int, Field(ge=0, le=MAX_LOGPROBS)]] = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    response_format: Any = None
    store: Any = None
    metadata: Any = None
    service_tier: Any = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None

    def new_tokens(self) -> int | None:
        if self.max_tokens is not None and self.max_completion_tokens not in (None, self.max_tokens):
            raise BadBody("give max_completion_tokens or max_tokens (its older name), not both",
                          "max_completion_tokens")
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def top_logprobs_count(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise BadBody("top_logprobs needs logprobs: true", "top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class BadBody(ValueError):
    """A request body that cannot be served; ``param`` names the field (None: the body itself)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message, self.param = message, param


def parse_body(raw: bytes, schema: type[_Common]) -> _Common:
    """The validated body, or BadBody naming the first bad field."""
    try:
        body = schema.model_validate_json(raw)
    except ValidationError as err:
        raise BadBody(*_describe(err.errors(include_url=False))) from None
    field = body.unsupported()
    if field is not None:
        raise BadBody(f"{field} is not supported by this server (only its default value is accepted)", field)
    return body


def _describe(errors: list[dict]) -> tuple[str, str | None]:
    """(message, param) for pydantic's errors: the first error's field path (dotted, without the
    union-member tags pydantic adds), with what every alternative of a union expected."""
    first = errors[0]
    if first["type"] == "json_invalid":
        reason = first["ctx"]["error"] if "ctx" in first else first["msg"]
        if "escape" in reason:
            reason += " (a lone UTF-16 surrogate such as \\ud800 is not text)"
        return f"malformed JSON body: {reason}", None
    if first["type"] == "extra_forbidden":
        param = ".".join(map(str, first["loc"]))
        return f"invalid request: {param} is not a field of this API (unknown fields are refused, not ignored)", param
    param = _path(first["loc"])
    msgs = list(dict.fromkeys(e["msg"] for e in errors if _path(e["loc"]) == param))
    return f"invalid request: {param or 'body'}: {' or '.join(msgs)}", param


def _path(loc: tuple) -> str | None:
    names = [str(p) for p in loc if isinstance(p, int) or (p.isidentifier() and p not in _TYPE_TAGS)]
    return ".".join(names) or None


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "function-after"}


def _same(a: Any, b: Any) -> bool:
    """JSON equality (True is not 1)."""
    return type(a) is type(b) and a == b if isinstance(a, bool) or isinstance(b, bool) else a == b

"""The body of `POST /v1/chat/completions`, declared: every field OpenAI clients send, its type and its
bounds, so that a bad value is a 400 naming the field (never a crash further in).

Types are strict (a string is not a number, 1 is not true) except that an integer may come as a float
with nothing after the point (100.0). Numbers are finite (Python's JSON reader lets NaN and Infinity
through), integers bounded, strings valid Unicode (a JSON string may hold a lone surrogate, which no
encoder takes). Keys this server does not know are ignored, as OpenAI-compatible servers do, so that
chat front-ends' extra settings pass. What each known field does here is in docs/CLI.md (serve).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

MAX_N = 8                 # answers per request; each is a row of the batch
MAX_STOPS = 4
MAX_TOKENS = 1 << 31      # far beyond any context; the model's own limit is checked later, by name


def _valid_unicode(value: Any) -> Any:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("must be valid Unicode text (it holds a lone surrogate)") from None
    return value


def _whole(value: Any) -> Any:
    """100.0 is the integer 100 (some clients write every number as a float); 100.5 stays an error."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Text = Annotated[str, BeforeValidator(_valid_unicode)]
Int = Annotated[int, BeforeValidator(_whole)]
Number = Annotated[float, Field(allow_inf_nan=False)]


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Any
    name: Text | None = None    # a speaker's name (front-ends send it for example dialogue); not used

    @field_validator("content")
    @classmethod
    def _text(cls, value: Any) -> str:
        """A string, or a list of text parts (joined); images and other parts are not for this model."""
        if isinstance(value, list):
            texts = []
            for k, part in enumerate(value):
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise ValueError(f"part {k}: only text parts are supported")
                if not isinstance(part.get("text"), str):
                    raise ValueError(f"part {k}: its text must be a string")
                try:
                    texts.append(_valid_unicode(part["text"]))
                except ValueError as e:
                    raise ValueError(f"part {k}: its text {e}") from None
            return "".join(texts)
        if not isinstance(value, str):
            raise ValueError("must be a string or a list of text parts")
        return _valid_unicode(value)


class StreamOptions(Strict):
    include_usage: bool = False


class ChatCompletionRequest(Strict):
    model: Annotated[Text, Field(min_length=1)]
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: Annotated[Int, Field(ge=1, le=MAX_TOKENS)] | None = None
    max_completion_tokens: Annotated[Int, Field(ge=1, le=MAX_TOKENS)] | None = None
    temperature: Annotated[Number, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Number, Field(gt=0, le=1)] | None = None
    top_k: Annotated[Int, Field(ge=-1, le=MAX_TOKENS)] | None = None   # 0 and -1: off
    presence_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    seed: Annotated[Int, Field(ge=-(1 << 63), le=(1 << 63) - 1)] | None = None
    n: Annotated[Int, Field(ge=1, le=MAX_N)] | None = None
    stop: Text | Annotated[list[Text], Field(max_length=MAX_STOPS)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = None      # vLLM's extra, sent by benchmark clients for fixed-length answers
    # Accepted and not used (docs/CLI.md says why for each):
    logit_bias: dict[str, Annotated[Number, Field(ge=-100, le=100)]] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[Int, Field(ge=0, le=20)] | None = None
    user: Text | None = None
    tools: Annotated[list[Any], Field(max_length=0)] | None = None
    tool_choice: Literal["none", "auto"] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None

    @field_validator("response_format")
    @classmethod
    def _plain_text(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and value.get("type") != "text":
            raise ValueError('only {"type": "text"}: this model is not constrained to JSON')
        return value


class BadRequest(Exception):
    """What is wrong with the body: a message and the field (OpenAI's `param`), e.g. `messages[0].content`."""

    def __init__(self, message: str, param: str | None, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


def parse(raw: bytes) -> ChatCompletionRequest:
    """The body read and checked; raises BadRequest with the first bad field."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise BadRequest("the body is not valid JSON (nested too deeply)", None, "invalid_json") from None
    except ValueError as e:   # JSONDecodeError, bytes that are not UTF-8, a number of 5,000 digits
        raise BadRequest(f"the body is not valid JSON ({type(e).__name__}: {e})", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object", None, "invalid_json")
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        first = e.errors(include_url=False, include_input=False)[0]
        param = _param(first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        tools = param == "tools" and first["type"] == "too_long"
        if tools:
            message = "tools are not supported: this model answers in text only (send none, or an empty list)"
        elif first["type"] == "missing":
            message = "is required" + (" (a string; GET /v1/models lists them)" if param == "model" else "")
        elif first["type"] == "too_short":
            message = "must be a non-empty list" if param == "messages" else "must not be empty"
        elif param is not None and param.startswith("stop"):
            message = f"must be a string or a list of at most {MAX_STOPS} strings"
        raise BadRequest(f"{param}: {message}" if param else message, param) from None


def _param(loc: tuple) -> str | None:
    """('messages', 0, 'content') -> 'messages[0].content'; the union branches pydantic names are dropped."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ChatCompletionRequest.model_fields or part in Message.model_fields or \
                part in StreamOptions.model_fields:
            out += f".{part}" if out else part
        elif not out:
            out = str(part)
    return out or None

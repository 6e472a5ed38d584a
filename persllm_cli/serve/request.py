"""A chat completion request to `persllm serve`: read, parsed and checked field by field; what is
wrong is an `ApiError` in OpenAI's shape (status, message, the field as `param`, a code)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from persllm_cli.core.errors import PersllmError
from persllm_cli.core.project import check_stage
from persllm_cli.model.generate import Sampling
from persllm_cli.persona.speaker import stage_ids
from persllm_cli.serve.state import Served, State


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}



@dataclass
class ChatRequest:
    model: str
    served: Served
    stage_id: str
    messages: list[dict[str, str]]
    sampling: Sampling
    stream: bool
    include_usage: bool


async def read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"request body too large ({length} bytes; at most {limit})", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body too large (at most {limit} bytes)", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _number(body: dict, name: str, kind: type, low: float | None = None, high: float | None = None,
            low_open: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
        raise ApiError(400, f"{name} must be {'an integer' if kind is int else 'a number'}, not {json.dumps(value)}",
                       param=name, code="invalid_value")
    bad = (low is not None and (value <= low if low_open else value < low)) or (high is not None and value > high)
    if bad:
        rng = f"{'more than' if low_open else 'at least'} {low}" + (f" and at most {high}" if high is not None else "")
        raise ApiError(400, f"{name} must be {rng}, not {value}", param=name, code="invalid_value")
    return kind(value)


def _content(m: Any, i: int) -> dict[str, str]:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise ApiError(400, f"{where} must be an object with role and content", param=where, code="invalid_value")
    role = m.get("role")
    if role == "developer":
        role = "system"
    if role not in ("system", "user", "assistant"):
        raise ApiError(400, f"{where}.role must be system, user or assistant, not {json.dumps(role)}",
                       param=f"{where}.role", code="invalid_value")
    content = m.get("content")
    if isinstance(content, list):  # content parts: text only
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"{where}.content: only text parts are supported", param=f"{where}.content",
                               code="invalid_value")
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise ApiError(400, f"{where}.content must be a string", param=f"{where}.content", code="invalid_value")
    return {"role": role, "content": content}


def parse_request(raw: bytes, state: State) -> ChatRequest:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON ({e.__class__.__name__}: {e})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model is required (a string; GET /v1/models lists them)", param="model",
                       code="invalid_value")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "messages must be a non-empty list", param="messages", code="invalid_value")
    messages = [_content(m, i) for i, m in enumerate(msgs)]
    if messages[-1]["role"] != "user":
        raise ApiError(400, "the last message must be the user's", param="messages", code="invalid_value")
    n = _number(body, "n", int, 1)
    if n is not None and n != 1:
        raise ApiError(400, "n must be 1: one answer per request", param="n", code="invalid_value")
    max_tokens = _number(body, "max_completion_tokens", int, 1)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", int, 1)
    temperature = _number(body, "temperature", float, 0, 2)
    top_p = _number(body, "top_p", float, 0, 1, low_open=True)
    seed = _number(body, "seed", int)
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise ApiError(400, "stop must be a string or a list of at most 4 strings", param="stop", code="invalid_value")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be true or false", param="stream", code="invalid_value")
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), bool):
            raise ApiError(400, "stream_options must be {\"include_usage\": true|false}", param="stream_options",
                           code="invalid_value")
        if not stream:
            raise ApiError(400, "stream_options is only allowed with stream: true", param="stream_options",
                           code="invalid_value")
        include_usage = bool(opts.get("include_usage", False))
    known = state.models()
    name, at, stage = model.rpartition("@")
    named = {s.name: s for s in state.served}
    if model not in known and at and name in named:
        try:
            check_stage(stage, stage_ids(named[name].speaker))
        except PersllmError as e:  # the model is served, the stage is not one of its
            raise ApiError(404, str(e), param="model", code="model_not_found") from None
    if model not in known:
        raise ApiError(404, f"the model {model!r} does not exist (GET /v1/models lists them: "
                       f"{', '.join(sorted(known))})", param="model", code="model_not_found")
    served, stage_id = known[model]
    lim = state.limits
    sampling = Sampling(max_new_tokens=max_tokens or lim.default_max_tokens,
                        temperature=lim.default_temperature if temperature is None else temperature,
                        top_p=1.0 if top_p is None else top_p, seed=seed, stop=stops)
    return ChatRequest(model, served, stage_id, messages, sampling, stream, include_usage)

"""A chat completion request to `persllm serve`: read, parsed (serve/schema.py declares the body), its
model found, its history fitted to that model's context and its prompt encoded. What is wrong is an
`ApiError` in OpenAI's shape (status, message, the field as `param`, a code).

`prepare` does the CPU work (JSON, validation, fitting, tokenizing) and runs in a worker thread, so a
long history never holds up the event loop that answers everyone else.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from persllm_cli.core.errors import PersllmError
from persllm_cli.core.project import check_stage
from persllm_cli.model.chat_format import PromptTooLong
from persllm_cli.model.generate import Sampling
from persllm_cli.persona.speaker import stage_ids
from persllm_cli.serve import schema
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
    n: int
    stream: bool
    include_usage: bool
    prompt: list[int] | None = None   # a run's prompt ids (the history as fitted); None for an API model


def check_json(request: Request) -> None:
    """POST bodies are JSON, said so: a web page can send text/plain to any address without asking
    (no CORS preflight), never application/json."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise ApiError(415, f"the body must be sent as Content-Type: application/json (not {kind or 'none'})",
                       code="unsupported_media_type")


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


def prepare(raw: bytes, state: State) -> ChatRequest:
    """The request checked and, for a run, its prompt encoded (in a worker thread)."""
    try:
        body = schema.parse(raw)
    except schema.BadRequest as e:
        raise ApiError(400, e.message, param=e.param, code=e.code) from None
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in body.messages]
    if messages[-1]["role"] != "user":
        raise ApiError(400, "the last message must be the user's", param="messages", code="invalid_value")
    if body.stream_options is not None and not body.stream:
        raise ApiError(400, "stream_options is only allowed with stream: true", param="stream_options",
                       code="invalid_value")
    served, stage_id = _find(body.model, state)
    lim = state.limits
    stops = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    sampling = Sampling(
        max_new_tokens=body.max_completion_tokens or body.max_tokens or lim.default_max_tokens,
        temperature=lim.default_temperature if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed, stop=tuple(s for s in stops if s),
        top_k=max(body.top_k or 0, 0), presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0, ignore_eos=bool(body.ignore_eos))
    req = ChatRequest(body.model, served, stage_id, messages, sampling, body.n or 1, bool(body.stream),
                      bool(body.stream_options and body.stream_options.include_usage))
    if served.key is not None:
        req.messages, req.prompt = _fit(served, stage_id, messages, sampling)
    return req


def _find(model: str, state: State) -> tuple[Served, str]:
    known = state.models()
    if model in known:
        return known[model]
    name, at, stage = model.rpartition("@")
    named = {s.name: s for s in state.served}
    if at and name in named:
        try:
            check_stage(stage, stage_ids(named[name].speaker))
        except PersllmError as e:  # the model is served, the stage is not one of its
            raise ApiError(404, str(e), param="model", code="model_not_found") from None
    raise ApiError(404, f"the model {model!r} does not exist (GET /v1/models lists them: "
                   f"{', '.join(sorted(known))})", param="model", code="model_not_found")


def _fit(served: Served, stage_id: str, messages: list[dict[str, str]],
         sampling: Sampling) -> tuple[list[dict[str, str]], list[int]]:
    """The oldest turns that do not fit next to max_tokens dropped (as `chat` does), and the prompt ids."""
    run = served.run
    context = run.context()
    asked = sampling.max_new_tokens
    if asked >= context:
        raise ApiError(400, f"max_tokens is {asked}, but {served.name} reads at most {context} tokens, prompt and "
                       f"answer together: ask for fewer than {context}", param="max_tokens",
                       code="context_length_exceeded")
    try:
        return run.fitted_prompt(messages, stage_id, sampling)
    except PromptTooLong as e:
        raise ApiError(400, f"the prompt takes {e.tokens} tokens even with only the system message and the last "
                       f"message kept, and {served.name}'s context of {context} tokens leaves {e.budget} for it next to "
                       f"max_tokens={asked}: shorten the message or ask for fewer tokens", param="messages",
                       code="context_length_exceeded") from None
    except PersllmError as e:   # a tokenizer that cannot encode a message's control-token text as text
        raise ApiError(400, str(e), param="messages", code="invalid_value") from None

"""The HTTP side of `persllm serve`: OpenAI-compatible /v1/models and /v1/chat/completions, /health,
and the chat page at /.

Errors always have OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with the status
that fits (400 bad request naming the field, 401 key, 404 model, 413 body too large, 429/503 with
Retry-After when the queue is full or the server is stopping); nothing else reaches the client,
never a traceback. One access-log line per request goes to stderr: method, path, status, ms and
tokens, never message text or the key.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from persllm_cli.core.errors import PersllmError
from persllm_cli.core.project import check_stage
from persllm_cli.model.generate import Sampling
from persllm_cli.persona.speaker import BatchSpeaker, Speaker, stage_ids
from persllm_cli.serve.batcher import Closed, QueueFull, Scheduler

STATIC = Path(__file__).parent / "static"
RETRY_AFTER = "1"


@dataclass
class Served:
    """One persona being served: a run whose model the scheduler decodes (`key` is its name there),
    or an API speaker (`key` None), which streams its own answers."""

    speaker: Speaker
    key: str | None = None

    @property
    def name(self) -> str:
        return self.speaker.name

    @property
    def run(self) -> BatchSpeaker:
        """The speaker as the scheduler needs it; only for a run (`key` set)."""
        assert self.key is not None and isinstance(self.speaker, BatchSpeaker)
        return self.speaker


@dataclass
class Limits:
    max_body_bytes: int = 1 << 20
    default_max_tokens: int = 256
    default_temperature: float = 0.7
    api_concurrency: int = 8


@dataclass
class State:
    served: list[Served]
    scheduler: Scheduler | None
    api_key: str | None = None
    limits: Limits = field(default_factory=Limits)
    draining: bool = False
    api_running: int = 0
    api_lock: threading.Lock = field(default_factory=threading.Lock)
    api_streams: set = field(default_factory=set)

    def models(self) -> dict[str, tuple[Served, str]]:
        """Model id -> (served, stage id): NAME@STAGE for every stage, NAME for the last one."""
        out: dict[str, tuple[Served, str]] = {}
        for s in self.served:
            for sid, _ in s.speaker.stages:
                out[f"{s.name}@{sid}"] = (s, sid)
            if s.speaker.stages:
                out[s.name] = (s, s.speaker.stages[-1][0])
        return out


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}


def error_response(status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}},
                        status_code=status, headers=headers)


def log_line(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


class AccessLog:
    """ASGI middleware: one line per HTTP request, written when its response has been sent."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = [0]

        async def sending(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            ms = (time.perf_counter() - start) * 1000
            st = scope.get("state") or {}
            tokens = st.get("tokens")
            extra = f" tokens={tokens[0]}+{tokens[1]}" if tokens else ""
            if st.get("disconnected"):
                extra += " client-gone"
            log_line(f"{scope.get('method', '-')} {scope.get('path', '-')} {status[0] or '-'} {ms:.0f}ms{extra}")


def create_app(state: State) -> FastAPI:
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app.state.persllm = state
    app.add_middleware(AccessLog)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return error_response(e.status, e.message, type=e.type, param=e.param, code=e.code, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no such endpoint: {request.method} {request.url.path}",
                   405: f"method {request.method} not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return error_response(e.status_code, message, code={404: "not_found"}.get(e.status_code))

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception) -> JSONResponse:
        log_line("internal error: " + "".join(traceback.format_exception_only(type(e), e)).strip())
        return error_response(500, "internal server error", type="server_error")

    def check_key(request: Request) -> None:
        if state.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), state.api_key.encode())
        if not ok:
            raise ApiError(401, "missing or wrong API key (send Authorization: Bearer KEY)" if given == ""
                           else "wrong API key", code="invalid_api_key")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        waiting = state.scheduler.waiting if state.scheduler else 0
        largest = state.scheduler.largest_batch if state.scheduler else 0
        return {"status": "stopping" if state.draining else "ok", "models": len(state.models()), "waiting": waiting,
                "largest_batch": largest}

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        files = {p.name: p for p in STATIC.iterdir() if p.is_file()}
        if name not in files:
            raise ApiError(404, f"no such file: {name}", code="not_found")
        return FileResponse(files[name])

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        check_key(request)
        data = []
        created = int(time.time())
        for mid, (s, sid) in state.models().items():
            data.append({"id": mid, "object": "model", "created": created, "owned_by": "persllm",
                         # persllm's own fields, for the page: who speaks, from which stage
                         "persona": s.speaker.persona, "description": s.speaker.description,
                         "stage": sid, "stage_label": dict(s.speaker.stages)[sid],
                         "default": "@" not in mid})
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def completions(request: Request) -> Response:
        check_key(request)
        body = await read_body(request, state.limits.max_body_bytes)
        req = parse_request(body, state)
        if state.draining:
            raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down",
                           headers={"Retry-After": RETRY_AFTER})
        served, stage_id = req.served, req.stage_id
        messages = req.messages
        if served.key is not None:
            try:
                messages, _ = served.run.fit(messages, stage_id, req.sampling)
            except PersllmError as e:
                raise ApiError(400, str(e), param="messages", code="context_length_exceeded") from None
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(event: tuple) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        handle = start_generation(state, served, messages, stage_id, req.sampling, emit)
        cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        if not req.stream:
            return await whole_answer(request, handle, events, cid, created, req.model)
        return StreamingResponse(stream_answer(request, handle, events, cid, created, req.model, req.include_usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


# --------------------------------------------------------------------------------- the request

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


# ------------------------------------------------------------------------------- generation

class ApiHandle:
    """A request to an --api-model speaker, streamed in its own thread."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()


def start_generation(state: State, served: Served, messages: list, stage_id: str, sampling: Sampling, emit) -> Any:
    if served.key is not None:
        assert state.scheduler is not None
        ids = served.run.prompt_ids(messages, stage_id)
        try:
            return state.scheduler.submit(served.key, ids, sampling, emit)
        except QueueFull:
            raise ApiError(429, "too many requests are waiting; retry shortly", type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": RETRY_AFTER}) from None
        except Closed:
            raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down",
                           headers={"Retry-After": RETRY_AFTER}) from None
    with state.api_lock:
        if state.api_running >= state.limits.api_concurrency:
            raise ApiError(429, "too many requests are in flight; retry shortly", type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": RETRY_AFTER})
        state.api_running += 1
    handle = ApiHandle()
    state.api_streams.add(handle)

    def work() -> None:
        pieces = 0
        text = ""
        try:
            from persllm_cli.persona.conversation import lstrip_stream

            gen: Iterator[str] = lstrip_stream(served.speaker.stream(messages, stage_id, sampling))
            reason = "length"
            try:
                for piece in gen:
                    if handle.cancelled.is_set():
                        reason = "stop"
                        break
                    pieces += 1
                    text += piece
                    emit(("text", piece))
                else:
                    reason = "stop"
            finally:
                close = getattr(gen, "close", None)
                if close:
                    close()
            prompt_chars = sum(len(m["content"]) for m in messages)
            # An API model's own token counts do not come back through the stream: estimated.
            emit(("done", reason, max(1, prompt_chars // 4), pieces))
        except PersllmError as e:
            emit(("error", str(e)))
        except Exception as e:  # noqa: BLE001
            emit(("error", f"the API model failed: {type(e).__name__}"))
        finally:
            with state.api_lock:
                state.api_running -= 1
            state.api_streams.discard(handle)

    threading.Thread(target=work, name="persllm-serve-api", daemon=True).start()
    return handle


def _usage(p: int, c: int) -> dict[str, int]:
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


async def whole_answer(request: Request, handle, events: asyncio.Queue, cid: str, created: int, model: str) -> Response:
    parts: list[str] = []
    try:
        while True:
            get = asyncio.ensure_future(events.get())
            while True:
                done, _ = await asyncio.wait({get}, timeout=0.5)
                if done:
                    break
                if await request.is_disconnected():
                    get.cancel()
                    request.state.disconnected = True
                    handle.cancel()
                    return Response(status_code=499)
            ev = get.result()
            if ev[0] == "text":
                parts.append(ev[1])
            elif ev[0] == "error":
                return error_response(500, ev[1], type="server_error")
            else:
                _, reason, p, c = ev
                request.state.tokens = (p, c)
                return JSONResponse({
                    "id": cid, "object": "chat.completion", "created": created, "model": model,
                    "system_fingerprint": None,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(parts),
                                                         "refusal": None},
                                 "logprobs": None, "finish_reason": reason}],
                    "usage": _usage(p, c),
                })
    finally:
        handle.cancel()


async def stream_answer(request: Request, handle, events: asyncio.Queue, cid: str, created: int, model: str,
                        include_usage: bool):
    def chunk(delta: dict, reason: str | None = None, usage: Any = ...) -> str:
        obj: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                               "system_fingerprint": None,
                               "choices": [] if usage is not ... and delta is None else
                               [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}
        if include_usage:
            obj["usage"] = None if usage is ... else usage
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    finished = False
    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            ev = await events.get()
            if ev[0] == "text":
                yield chunk({"content": ev[1]})
            elif ev[0] == "error":
                err = {"error": {"message": ev[1], "type": "server_error", "param": None, "code": None}}
                yield f"data: {json.dumps(err)}\n\n"
                break
            else:
                _, reason, p, c = ev
                request.state.tokens = (p, c)
                yield chunk({}, reason)
                if include_usage:
                    yield chunk(None, usage=_usage(p, c))
                break
        yield "data: [DONE]\n\n"
        finished = True
    finally:
        if not finished:
            request.state.disconnected = True
        handle.cancel()

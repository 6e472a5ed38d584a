"""The HTTP side of `persllm serve`: OpenAI-compatible /v1/models and /v1/chat/completions, /health,
and the chat page at /. What a request asks for is parsed in serve/request.py; runs are answered by
the scheduler (serve/batcher.py), an --api-model speaker in a thread of its own.

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
from pathlib import Path
from typing import Any, Iterator

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from persllm_cli.core.errors import PersllmError
from persllm_cli.model.generate import Sampling
from persllm_cli.serve.batcher import Closed, QueueFull
from persllm_cli.serve.request import ApiError, parse_request, read_body
from persllm_cli.serve.state import Served, State

STATIC = Path(__file__).parent / "static"
RETRY_AFTER = "1"


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

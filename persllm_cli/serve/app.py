"""The HTTP side of `persllm serve`: OpenAI-compatible /v1/models and /v1/chat/completions, /health,
and the chat page at /. What a request asks for is parsed and prepared in serve/request.py (in a
worker thread), its answers started in serve/generation.py (runs by the scheduler, serve/batcher.py;
an --api-model speaker in a thread of its own) and sent in serve/answer.py.

Errors always have OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with the status
that fits (400 bad request naming the field, 401 key, 404 model, 413 body too large, 415 not JSON,
421 a Host not this server's while keyless, 429/503 with Retry-After when the queue is full or the
server is stopping); nothing else reaches the client, never a traceback. One access-log line per
request goes to stderr: method, path, status, ms and tokens, never message text or the key.
"""

from __future__ import annotations

import asyncio
import hmac
import sys
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from persllm_cli.serve import answer, generation
from persllm_cli.serve.answer import error_response
from persllm_cli.serve.guard import HostGuard, loopback_names
from persllm_cli.serve.request import ApiError, check_json, prepare, read_body
from persllm_cli.serve.state import State

STATIC = Path(__file__).parent / "static"


def log_line(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


class AccessLog:
    """ASGI middleware: one line per HTTP request, written when its response has been sent; it also
    counts the requests in flight (a stopping server waits for them)."""

    def __init__(self, app: Any, state: State) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        self.state.in_flight += 1
        start = time.perf_counter()
        status = [0]

        async def sending(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.state.in_flight -= 1
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
    app.add_middleware(HostGuard, names=None if state.api_key else loopback_names(state.host))
    app.add_middleware(AccessLog, state=state)   # added last: outermost, so it logs the guard's refusals too

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
                         "default": "@" not in mid,
                         # vLLM's field: tokens a request may take, prompt and answer (a run only)
                         **({"max_model_len": s.run.context()} if s.key is not None else {})})
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def completions(request: Request) -> Response:
        check_key(request)
        check_json(request)
        body = await read_body(request, state.limits.max_body_bytes)
        stopping()
        req = await asyncio.to_thread(prepare, body, state)   # JSON, checks, fitting, tokens: off the loop
        stopping()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(event: tuple) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:   # the loop has closed (the server stopped): nobody is listening
                pass

        handles = generation.start(state, req, emit)
        cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        prompt = len(req.prompt) if req.prompt is not None else generation.estimate(req.messages)
        if not req.stream:
            with state.answering(emit):
                return await answer.whole(request, handles, events, cid, created, req.model, prompt)

        async def body():
            with state.answering(emit):
                async for part in answer.stream(request, handles, events, cid, created, req.model,
                                                req.include_usage, prompt):
                    yield part

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def stopping() -> None:
        if state.draining:
            raise ApiError(503, "the server is shutting down", **generation.SHUTTING_DOWN)

    return app

"""The answer to a chat completion request in OpenAI's two shapes: one JSON object (`whole`), or a
server-sent event stream of chunks (`stream`), from the events serve/generation.py hands over.

A stream opens with a role chunk per choice, then content deltas, a last chunk per choice with its
`finish_reason`, the usage chunk (empty `choices`) when asked, then `data: [DONE]`. An answer cut
short by the server's shutdown ends with "length" (see docs/CLI.md); one that never started because
the server is stopping is a 503 (whole) or an error event with code `shutting_down` (stream).

The cut reaches an answer as a ("cut", None) event put in its queue by the stopping server itself,
not through the model: a decode step in progress on a busy CPU may take seconds, and the grace must
hold anyway. The completion tokens of a cut answer then count the text pieces sent (near enough:
a token sends at most one).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from persllm_cli.serve.generation import SHUTTING_DOWN


def error_response(status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}},
                        status_code=status, headers=headers)


def _usage(p: int, c: int) -> dict[str, int]:
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _cancel(handles: list[Any]) -> None:
    for h in handles:
        h.cancel()


def _cut(ends: dict[int, tuple[str, int, int]], n: int, prompt: int, sent: list[int]) -> list[int]:
    """The choices still open, ended as cut short; returns their indexes."""
    open_ = [i for i in range(n) if i not in ends]
    for i in open_:
        ends[i] = ("length", prompt, sent[i])
    return open_


async def whole(request: Request, handles: list[Any], events: asyncio.Queue, cid: str, created: int,
                model: str, prompt: int) -> Response:
    n = len(handles)
    parts: list[list[str]] = [[] for _ in range(n)]
    ends: dict[int, tuple[str, int, int]] = {}
    try:
        while len(ends) < n:
            get = asyncio.ensure_future(events.get())
            while True:
                done, _ = await asyncio.wait({get}, timeout=0.5)
                if done:
                    break
                if await request.is_disconnected():
                    get.cancel()
                    request.state.disconnected = True
                    return Response(status_code=499)
            ev = get.result()
            kind, i = ev[0], ev[1]
            if kind == "text":
                parts[i].append(ev[2])
            elif kind == "cut":
                _cut(ends, n, prompt, [len(p) for p in parts])
            elif kind == "error":
                return error_response(500, ev[2], type="server_error")
            elif kind == "gone":
                s = SHUTTING_DOWN
                return error_response(503, "the server is shutting down", type=s["type"], code=s["code"],
                                      headers=s["headers"])
            elif i not in ends:
                ends[i] = ev[2:]
        prompt = ends[0][1]
        completion = sum(c for _, _, c in ends.values())
        request.state.tokens = (prompt, completion)
        return JSONResponse({
            "id": cid, "object": "chat.completion", "created": created, "model": model, "system_fingerprint": None,
            "choices": [{"index": i, "message": {"role": "assistant", "content": "".join(parts[i]), "refusal": None},
                         "logprobs": None, "finish_reason": ends[i][0]} for i in range(n)],
            "usage": _usage(prompt, completion),
        })
    finally:
        _cancel(handles)


async def stream(request: Request, handles: list[Any], events: asyncio.Queue, cid: str, created: int, model: str,
                 include_usage: bool, prompt: int):
    def chunk(i: int | None, delta: dict | None = None, reason: str | None = None, usage: Any = ...) -> str:
        obj: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                               "system_fingerprint": None,
                               "choices": [] if i is None else
                               [{"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}]}
        if include_usage:
            obj["usage"] = None if usage is ... else usage
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def error(message: str, type: str = "server_error", code: str | None = None) -> str:
        return f"data: {json.dumps({'error': {'message': message, 'type': type, 'param': None, 'code': code}})}\n\n"

    n = len(handles)
    ends: dict[int, tuple[str, int, int]] = {}
    sent = [0] * n
    finished = False
    try:
        for i in range(n):
            yield chunk(i, {"role": "assistant", "content": ""})
        while len(ends) < n:
            ev = await events.get()
            kind, i = ev[0], ev[1]
            if kind == "text":
                sent[i] += 1
                yield chunk(i, {"content": ev[2]})
            elif kind == "cut":
                for k in _cut(ends, n, prompt, sent):
                    yield chunk(k, {}, "length")
            elif kind == "error":
                yield error(ev[2])
                break
            elif kind == "gone":
                yield error("the server is shutting down; retry shortly", code=SHUTTING_DOWN["code"])
                break
            elif i not in ends:
                ends[i] = ev[2:]
                yield chunk(i, {}, ends[i][0])
        if len(ends) == n:
            prompt, completion = ends[0][1], sum(c for _, _, c in ends.values())
            request.state.tokens = (prompt, completion)
            if include_usage:
                yield chunk(None, usage=_usage(prompt, completion))
        yield "data: [DONE]\n\n"
        finished = True
    finally:
        if not finished:
            request.state.disconnected = True
        _cancel(handles)

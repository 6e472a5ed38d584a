"""Starting the answers to a request: `n` of them, each a row of the scheduler's batch (a run) or a
thread streaming from an --api-model speaker. Each answer's events reach `emit` tagged with its index:
("text", i, str), ("done", i, finish_reason, prompt_tokens, completion_tokens), ("error", i, message),
or ("gone", i) when the server stopped before it began.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import Any, Callable, Iterator

from persllm_cli.core.errors import PersllmError
from persllm_cli.model.generate import Sampling
from persllm_cli.serve.batcher import Closed, QueueFull
from persllm_cli.serve.request import ApiError, ChatRequest
from persllm_cli.serve.state import State

RETRY_AFTER = "1"
SHUTTING_DOWN = dict(type="server_error", code="shutting_down", headers={"Retry-After": RETRY_AFTER})


def start(state: State, req: ChatRequest, emit: Callable[[tuple], None]) -> list[Any]:
    """One handle per answer (each has `cancel()`); all or none are started."""
    handles: list[Any] = []
    try:
        for i in range(req.n):
            sampling = req.sampling
            if i and sampling.seed is not None:   # the same seed n times would give n equal answers
                sampling = replace(sampling, seed=sampling.seed + i)
            handles.append(_start_one(state, req, sampling, lambda ev, i=i: emit((ev[0], i, *ev[1:]))))
    except ApiError:
        for h in handles:
            h.cancel()
        raise
    return handles


def _start_one(state: State, req: ChatRequest, sampling: Sampling, emit: Callable[[tuple], None]) -> Any:
    if req.served.key is not None:
        assert state.scheduler is not None and req.prompt is not None
        try:
            return state.scheduler.submit(req.served.key_at(req.stage_id), req.prompt, sampling, emit)
        except QueueFull:
            raise ApiError(429, "too many requests are waiting; retry shortly", type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": RETRY_AFTER}) from None
        except Closed:
            raise ApiError(503, "the server is shutting down", **SHUTTING_DOWN) from None
    with state.api_lock:
        if state.api_running >= state.limits.api_concurrency:
            raise ApiError(429, "too many requests are in flight; retry shortly", type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": RETRY_AFTER})
        state.api_running += 1
    handle = ApiHandle()
    state.api_streams.add(handle)
    threading.Thread(target=_api_answer, args=(state, req, sampling, handle, emit), name="persllm-serve-api",
                     daemon=True).start()
    return handle


class ApiHandle:
    """An answer from an --api-model speaker, streamed in its own thread: `cancel()` when its client
    has gone, `cut()` when the shutdown grace is over (it then ends with "length", like a row)."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self.reason = "stop"

    def cancel(self) -> None:
        self.cancelled.set()

    def cut(self) -> None:
        self.reason = "length"
        self.cancelled.set()


def _api_answer(state: State, req: ChatRequest, sampling: Sampling, handle: ApiHandle,
                emit: Callable[[tuple], None]) -> None:
    from persllm_cli.persona.conversation import lstrip_stream

    pieces = 0
    try:
        gen: Iterator[str] = lstrip_stream(req.served.speaker.stream(req.messages, req.stage_id, sampling))
        reason = "length"
        try:
            for piece in _cut_at_stops(gen, sampling.stop):
                if handle.cancelled.is_set():
                    reason = handle.reason
                    break
                if piece is None:   # a stop string came
                    reason = "stop"
                    break
                pieces += 1
                emit(("text", piece))
            else:
                reason = "stop"
        finally:
            close = getattr(gen, "close", None)
            if close:
                close()
        emit(("done", reason, estimate(req.messages), pieces))
    except PersllmError as e:
        emit(("error", str(e)))
    except Exception as e:  # noqa: BLE001 - the client hears of it, in one line
        emit(("error", f"the API model failed: {type(e).__name__}"))
    finally:
        with state.api_lock:
            state.api_running -= 1
        state.api_streams.discard(handle)


def estimate(messages: list[dict[str, str]]) -> int:
    """An API model's prompt tokens, which do not come back through its stream: characters / 4."""
    return max(1, sum(len(m["content"]) for m in messages) // 4)


def _cut_at_stops(pieces: Iterator[str], stops: tuple[str, ...]) -> Iterator[str | None]:
    """The pieces up to the first stop string (then None); text that may begin one is held back."""
    if not stops:
        yield from pieces
        return
    keep = max(len(s) for s in stops) - 1
    held = ""
    for piece in pieces:
        held += piece
        cuts = [held.find(s) for s in stops if s in held]
        if cuts:
            if held[:min(cuts)]:
                yield held[:min(cuts)]
            yield None
            return
        if len(held) > keep:
            yield held[:len(held) - keep]
            held = held[len(held) - keep:]
    if held:
        yield held

"""The retry policy of every API request: exponential backoff with full jitter, the server's
Retry-After honoured. The runner waits `backoff()` between attempts; converse's turns and judge
go through `retrying()`, which waits the same."""

from __future__ import annotations

import random
import time
from typing import Callable, TypeVar

from persllm_cli.llm.protocol import TransientError

T = TypeVar("T")
BACKOFF_MAX = 60.0   # the longest wait between two attempts, in seconds


def backoff(attempt: int, retry_after: float | None, base: float, cap: float = BACKOFF_MAX) -> float:
    """Seconds to wait after failed attempt `attempt` (0 = the first): the server's Retry-After
    when it sent one, else up to `base` * 2**attempt, drawn at random (full jitter); at most `cap`."""
    if retry_after is not None:
        # The server said when; add a little jitter so workers do not return in lockstep.
        return min(retry_after, cap) + random.uniform(0, 0.1)
    return random.uniform(0, min(cap, base * 2 ** attempt))


def retrying(call: Callable[[], T], *, max_retries: int, base: float, cap: float = BACKOFF_MAX,
             on_retry: Callable[[TransientError], None] | None = None) -> T:
    """`call()` until it returns: a TransientError is retried `max_retries` times, `backoff()`
    apart (`on_retry` hears of each), then raised. Other errors are raised at once."""
    attempt = 0
    while True:
        try:
            return call()
        except TransientError as e:
            if attempt == max_retries:
                raise
            if on_retry is not None:
                on_retry(e)
            time.sleep(backoff(attempt, e.retry_after, base, cap))
            attempt += 1

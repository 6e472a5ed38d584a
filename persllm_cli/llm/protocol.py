"""The Backend protocol: what every stage that asks a model for text (annotate, dpo --mode generate,
eval's judge and baseline, chat --api-model, converse) may rely on, whichever provider answers.

A provider is one module (openai_compat.py, local.py) and one entry in registry.py, which is how
every caller gets a backend:

    backend = make_backend("openai", "gpt-4o-mini", base_url=None, timeout=120)   # or "local"
    backend.check()                                   # fail fast, before any output is written
    c = backend.complete(messages, max_tokens=1024, temperature=0.7)   # -> Completion
    c = backend.complete(messages, max_tokens=96, temperature=0.7,      # optional hints, which
                         sections=["question", "response"], stage_token="<TIME-I>")  # only local uses

Backends are synchronous and thread-safe; the concurrent runner calls them from worker threads.

Errors: `TransientError` (timeouts, connection errors, 429, 5xx: retry, honouring `retry_after`;
its `kind` says "timeout", "overload" (429, 503, connection refused: the server cannot keep up,
send less) or "other"),
`FatalError` (a PersllmError: bad key, unknown model, unreachable server before anything worked),
`RequestError` (this one request cannot work, e.g. a 400 for a too-long prompt: fail the item),
`Stopped` (the caller set the `stop` event it passed: the request was given up, nothing to record).

`estimate_tokens` / `estimate_prompt_tokens` give generous token counts for budgets and --dry-run.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

from persllm_cli.core.errors import PersllmError
from persllm_cli.data.records import Message


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    model: str
    first_token_seconds: float | None = None   # a streamed reply's wait for its first chunk
    usage: str = "counted"   # where the token counts come from: "server" (the API's usage),
                             # "estimate" (a server that sent none) or "counted" (a local model)


class TransientError(Exception):
    """A failure worth retrying. `retry_after` is the server's Retry-After in seconds, if it sent one;
    `streamed` how long the reply had been coming (first token to last) before it was given up,
    None when no token had come."""

    def __init__(self, message: str, retry_after: float | None = None, kind: str = "other",
                 streamed: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after
        self.kind = kind   # "timeout", "overload" or "other"
        self.streamed = streamed


class FatalError(PersllmError):
    """A failure no retry will fix (bad key, unknown model, unreachable server)."""


class RequestError(Exception):
    """This one request cannot succeed (e.g. 400: prompt too long); record the item as failed and go on."""


class Backend(Protocol):
    """A provider's class is built as `Provider(model, base_url=..., timeout=...)` (registry.py);
    a provider without a server ignores `base_url`, one that does not stream ignores `timeout`."""

    name: str   # the registry's name for it: "openai", "local"
    model: str
    # Generates inside this process (torch): a thread still in `complete` when the interpreter
    # exits aborts it, so callers must stop it (`stop`) and join it before exiting.
    in_process: bool

    def complete(self, messages: list[Message], *, max_tokens: int, temperature: float,
                 sections: list[str] | None = None, stage_token: str | None = None,
                 stop: threading.Event | None = None,
                 on_text: Callable[[str], None] | None = None) -> Completion:
        """One chat completion. Raises TransientError or FatalError.

        Optional hints (a backend may ignore them; callers pass them only when they have them):
        `sections`, the labelled sections the reply must contain, in order ("question", "analysis",
        "response"), which lets a small local model be guided through the format; `stage_token`,
        the time token of the record's stage, which a trained run puts first; `stop`, an event
        that, once set, makes an in-process backend give up between tokens and raise Stopped;
        `on_text`, called with the reply's text as it comes (a backend that does not stream calls
        it once, with the whole text)."""
        ...

    def stream(self, messages: list[Message], *, max_tokens: int, temperature: float,
               retries: int = 2) -> Iterator[str]:
        """One chat completion as pieces of text, as they come (a person is watching: `chat`).
        Errors as `complete`'s."""
        ...

    def check(self) -> None:
        """Fail fast (FatalError) when the backend cannot work at all: no key, server unreachable,
        unknown model. Called once before a run starts."""
        ...


_CJK = re.compile("[\u3040-\u9fff\uac00-\ud7af]")   # the characters counted one token each


def estimate_tokens(text: str) -> int:
    """A deliberately generous token count for budgets and --dry-run: ~3 characters per token, and
    one token per CJK character (tokenizers rarely do better on those)."""
    cjk = len(_CJK.findall(text))
    return cjk + (len(text) - cjk + 2) // 3


def estimate_prompt_tokens(messages: list[Message]) -> int:
    return sum(estimate_tokens(m.get("content", "")) + 4 for m in messages) + 3




def redact_url(url: str) -> str:
    """A server's base URL fit for messages and sidecars: user:password@ and query strings dropped."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))

"""Annotator backends behind one interface.

Every stage that asks a model for text (annotate, dpo --mode generate, eval, chat --api-model)
goes through a `Backend`. Backends are synchronous and thread-safe; the concurrent runner calls
them from worker threads.

- `OpenAIBackend`: any OpenAI-compatible server via the `openai` package. The key comes from
  OPENAI_API_KEY only and is never stored, logged or put in an error message.
- `LocalBackend`: a transformers model on this machine (the embedded smollm2-135m, a model
  directory, or a trained runs/NAME), so the pipeline works offline.

Errors: `TransientError` (timeouts, connection errors, 429, 5xx: retry, honouring `retry_after`),
`FatalError` (a PersllmError: bad key, unknown model, unreachable server before anything worked).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from persllm_cli.errors import PersllmError

Message = dict[str, str]


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    model: str


class TransientError(Exception):
    """A failure worth retrying. `retry_after` is the server's Retry-After in seconds, if it sent one."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class FatalError(PersllmError):
    """A failure no retry will fix (bad key, unknown model, unreachable server)."""


class Backend(Protocol):
    name: str   # "openai" or "local"
    model: str

    def complete(self, messages: list[Message], *, max_tokens: int, temperature: float) -> Completion:
        """One chat completion. Raises TransientError or FatalError."""
        ...

    def check(self) -> None:
        """Fail fast (FatalError) when the backend cannot work at all: no key, server unreachable,
        unknown model. Called once before a run starts."""
        ...

"""The providers behind `--backend`: one entry each, and the one way every caller gets a backend.

annotate, dpo --mode generate, eval (its judge and its prompted baseline), chat --api-model,
serve's API personas and converse all call `make_backend`. Adding a provider is one module (a
class that keeps the Backend protocol, protocol.py) and one entry in PROVIDERS; --backend's
choices and help come from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from persllm_cli.core.errors import PersllmError
from persllm_cli.llm.local import LocalBackend
from persllm_cli.llm.openai_compat import OpenAIBackend
from persllm_cli.llm.protocol import Backend
from persllm_cli.model.bases import DEFAULT_BASE


@dataclass(frozen=True)
class Provider:
    make: Callable[..., Backend]   # make(model, base_url=..., timeout=...): building one sends nothing
    default_model: str             # the model when none is named (annotate, dpo --mode generate)
    about: str                     # for --backend's help


PROVIDERS: dict[str, Provider] = {
    "openai": Provider(OpenAIBackend, "gpt-4o-mini", "any OpenAI-compatible server"),
    "local": Provider(LocalBackend, DEFAULT_BASE, "transformers, offline"),
}
BACKENDS = tuple(PROVIDERS)   # the choices of --backend
BACKENDS_HELP = " or ".join(f"{name} ({p.about})" for name, p in PROVIDERS.items())

# The provider of a model named by its server's name alone: --api-model, --judge, api:MODEL speakers.
API = "openai"


def default_model(name: str) -> str:
    return _provider(name).default_model


def make_backend(name: str, model: str | None = None, base_url: str | None = None,
                 timeout: float = 120.0) -> Backend:
    """A backend of provider `name` for `model` (default: the provider's). `timeout`: the longest
    silence inside a streamed reply (see openai_compat.py). Nothing is sent before `check()`."""
    provider = _provider(name)
    return provider.make(model or provider.default_model, base_url=base_url, timeout=timeout)


def _provider(name: str) -> Provider:
    if name not in PROVIDERS:
        raise PersllmError(f"unknown backend {name!r} (use {' or '.join(PROVIDERS)})")
    return PROVIDERS[name]

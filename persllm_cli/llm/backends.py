"""Annotator backends behind one interface.

Every stage that asks a model for text (annotate, dpo --mode generate, eval, chat --api-model)
goes through a `Backend`. Backends are synchronous and thread-safe; the concurrent runner calls
them from worker threads.

- `OpenAIBackend`: any OpenAI-compatible server via the `openai` package. The key comes from
  OPENAI_API_KEY only and is never stored, logged or put in an error message.
- `LocalBackend`: a transformers model on this machine (the embedded smollm2-135m, a model
  directory, or a trained runs/NAME), so the pipeline works offline.

Errors: `TransientError` (timeouts, connection errors, 429, 5xx: retry, honouring `retry_after`),
`FatalError` (a PersllmError: bad key, unknown model, unreachable server before anything worked),
`RequestError` (this one request cannot work, e.g. a 400 for a too-long prompt: fail the item),
`Stopped` (the caller set the `stop` event it passed: the request was given up, nothing to record).

    backend = make_backend("openai", "gpt-4o-mini", base_url=None, timeout=120)   # or "local"
    backend.check()                                   # fail fast, before any output is written
    c = backend.complete(messages, max_tokens=1024, temperature=0.7)   # -> Completion
    c = backend.complete(messages, max_tokens=96, temperature=0.7,      # optional hints, which
                         sections=["question", "response"], stage_token="<TIME-I>")  # only local uses

`estimate_tokens` / `estimate_prompt_tokens` give generous token counts for budgets and --dry-run.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Iterator, Protocol

from persllm_cli.core.errors import PersllmError

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
    # Generates inside this process (torch): a thread still in `complete` when the interpreter
    # exits aborts it, so callers must stop it (`stop`) and join it before exiting.
    in_process: bool

    def complete(self, messages: list[Message], *, max_tokens: int, temperature: float,
                 sections: list[str] | None = None, stage_token: str | None = None,
                 stop: threading.Event | None = None) -> Completion:
        """One chat completion. Raises TransientError or FatalError.

        Optional hints (a backend may ignore them; callers pass them only when they have them):
        `sections`, the labelled sections the reply must contain, in order ("question", "analysis",
        "response"), which lets a small local model be guided through the format; `stage_token`,
        the time token of the record's stage, which a trained run puts first; `stop`, an event
        that, once set, makes an in-process backend give up between tokens and raise Stopped."""
        ...

    def check(self) -> None:
        """Fail fast (FatalError) when the backend cannot work at all: no key, server unreachable,
        unknown model. Called once before a run starts."""
        ...


class RequestError(Exception):
    """This one request cannot succeed (e.g. 400: prompt too long); record the item as failed and go on."""


def estimate_tokens(text: str) -> int:
    """A deliberately generous token count for budgets and --dry-run: ~3 characters per token, and
    one token per CJK character (tokenizers rarely do better on those)."""
    cjk = sum(1 for ch in text if "\u3040" <= ch <= "\u9fff" or "\uac00" <= ch <= "\ud7af")
    return cjk + (len(text) - cjk + 2) // 3


def estimate_prompt_tokens(messages: list[Message]) -> int:
    return sum(estimate_tokens(m.get("content", "")) + 4 for m in messages) + 3


def _retry_after(headers: Any) -> float | None:
    """Seconds from Retry-After (seconds or an HTTP date) or retry-after-ms, if the server sent one."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    from email.utils import parsedate_to_datetime
    import datetime as dt

    try:
        when = parsedate_to_datetime(value)
        return max(0.0, (when - dt.datetime.now(dt.timezone.utc)).total_seconds())
    except (TypeError, ValueError):
        return None


def redact_url(url: str | None) -> str:
    """A base URL fit for messages and sidecars: user:password@ and query strings dropped."""
    if not url:
        return "https://api.openai.com/v1"
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


# Reasoning models take max_completion_tokens instead of max_tokens.
_REASONING_PREFIXES = ("o1", "o3", "o4", "gpt-5")


class OpenAIBackend:
    """Any OpenAI-compatible chat server through the `openai` package (sync client, thread-safe).

    The client never retries by itself (`max_retries=0`): the runner owns retries, backoff and
    accounting. The key is read from OPENAI_API_KEY, kept in the client only, and scrubbed from
    every message this class raises.
    """

    name = "openai"
    in_process = False   # a request in flight is left to die with the process (no torch in it)

    def __init__(self, model: str, base_url: str | None = None, timeout: float = 120.0):
        import os

        self.model = model
        self._key = os.environ.get("OPENAI_API_KEY", "")
        if not self._key.strip():
            raise FatalError("OPENAI_API_KEY is not set; export your key (it is read only from the "
                             "environment, never from a flag)")
        self.base_url = base_url or os.environ.get("OPENAI_BASE_URL") or None
        self.where = redact_url(self.base_url)
        import openai

        self._openai = openai
        self._client = openai.OpenAI(api_key=self._key, base_url=self.base_url, timeout=timeout, max_retries=0)

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def _message(self, e: Exception) -> str:
        body = getattr(e, "body", None)
        msg = body.get("message") if isinstance(body, dict) and isinstance(body.get("message"), str) else None
        if msg is None and isinstance(body, dict) and isinstance(body.get("error"), dict):
            msg = body["error"].get("message")
        return self._scrub(" ".join(str(msg or e).split()))[:300]

    def _translate(self, e: Exception) -> Exception:
        """Map an openai exception to TransientError / FatalError / RequestError."""
        o = self._openai
        if isinstance(e, o.APITimeoutError):
            return TransientError(f"request timed out ({self.where})")
        if isinstance(e, o.APIConnectionError):
            return TransientError(f"cannot connect to {self.where}")
        if isinstance(e, o.APIStatusError):
            status = e.status_code
            retry = _retry_after(getattr(e.response, "headers", None))
            if isinstance(e, o.RateLimitError) or status == 429:
                return TransientError(f"rate limited (429): {self._message(e)}", retry_after=retry)
            if status >= 500 or status == 408 or status == 409:
                return TransientError(f"server error ({status}): {self._message(e)}", retry_after=retry)
            if isinstance(e, (o.AuthenticationError, o.PermissionDeniedError)) or status in (401, 403):
                return FatalError(f"{self.where} rejected the API key ({status}): {self._message(e)} "
                                  "(check OPENAI_API_KEY)")
            if isinstance(e, o.NotFoundError) or status == 404:
                return FatalError(f"the server at {self.where} does not know the model {self.model!r} "
                                  f"(404 not found: {self._message(e)}); check the model name and the base URL")
            return RequestError(f"request refused ({status}): {self._message(e)}")
        return e

    def check(self) -> None:
        """GET /models: an unreachable server or a rejected key stop here, before any work."""
        try:
            ids = [m.id for m in self._client.models.list().data]
        except self._openai.NotFoundError:
            return  # some servers have no /models; the first completion will tell
        except self._openai.APIConnectionError:
            raise FatalError(f"cannot reach the server at {self.where} (is it running? check --base-url "
                             "or OPENAI_BASE_URL)") from None
        except self._openai.APIError as e:
            err = self._translate(e)
            if isinstance(err, FatalError):
                raise err from None
            return  # a transient problem on /models is not a reason to refuse to start
        # A model missing from the list is not refused here: some servers (llama.cpp) answer to
        # any name. A real "model not found" comes back as 404 from the first request (fatal).
        del ids

    def _request(self, messages: list[Message], max_tokens: int, temperature: float) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"model": self.model, "messages": messages}
        if self.model.startswith(_REASONING_PREFIXES):
            kwargs["max_completion_tokens"] = max_tokens
        else:
            kwargs["max_tokens"] = max_tokens
            kwargs["temperature"] = temperature
        return kwargs

    def stream(self, messages: list[Message], *, max_tokens: int, temperature: float,
               retries: int = 2) -> Iterator[str]:
        """One chat completion as text pieces, as they arrive (for a person watching: `chat`).
        The client retries a failed connection `retries` times; errors are translated like
        `complete`'s (TransientError / FatalError / RequestError)."""
        client = self._client.with_options(max_retries=retries)
        try:
            response = client.chat.completions.create(**self._request(messages, max_tokens, temperature),
                                                      stream=True)
            for chunk in response:
                for choice in chunk.choices or []:
                    text = getattr(choice.delta, "content", None)
                    if text:
                        yield text
        except self._openai.APIError as e:
            raise self._translate(e) from None

    def complete(self, messages: list[Message], *, max_tokens: int, temperature: float,
                 sections: list[str] | None = None, stage_token: str | None = None,
                 stop: threading.Event | None = None) -> Completion:
        import time

        del sections, stage_token, stop  # a capable API model follows the format in the prompt
        t0 = time.perf_counter()
        try:
            resp = self._client.chat.completions.create(**self._request(messages, max_tokens, temperature))
        except self._openai.APIError as e:
            raise self._translate(e) from None
        seconds = time.perf_counter() - t0
        text = ""
        if resp.choices:
            text = resp.choices[0].message.content or ""
        usage = resp.usage
        if usage is not None and usage.prompt_tokens is not None:
            pt, ct = int(usage.prompt_tokens), int(usage.completion_tokens or 0)
        else:  # servers without usage: estimate, so accounting still adds up
            pt, ct = estimate_prompt_tokens(messages), estimate_tokens(text)
        return Completion(text=text, prompt_tokens=pt, completion_tokens=ct, seconds=seconds,
                          model=resp.model or self.model)


class LocalBackend:
    """A transformers causal LM on this machine: the embedded smollm2-135m, a model directory or
    hub id, or a trained persllm run (loaded by inference.load_run; its stage's time token goes
    first, as in training). Loaded once, on first use; generation is serialised with a lock because
    one model object is not safe to drive from several threads.

    With `sections` the reply is generated section by section under labels we write (guided.py):
    small models do not keep a labelled format by themselves."""

    name = "local"
    in_process = True

    def __init__(self, model: str = "smollm2-135m", device: str | None = None):
        self.model = model
        self.device = device
        self.run_stages: list[dict[str, str]] | None = None   # set when `model` is a trained run
        self._lock = threading.Lock()
        self._loaded: tuple[Any, Any, Any] | None = None

    def _load(self) -> tuple[Any, Any, Any]:
        with self._lock:
            if self._loaded is None:
                self._loaded = self._load_now()
            return self._loaded

    def _load_now(self) -> tuple[Any, Any, Any]:
        from pathlib import Path

        import torch

        from persllm_cli.model.guided import Decoder

        path = Path(self.model).expanduser()
        if (path / "run.json").is_file():
            from persllm_cli.model.load import load_run

            model, tok, info = load_run(path)
            self.run_stages = info.stages
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            from persllm_cli.model import bases as models

            device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
            base = models.resolve_base(self.model)
            tok = AutoTokenizer.from_pretrained(base)
            dtype = torch.bfloat16 if device == "cuda" else torch.float32
            model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).to(device)
        model.eval()
        self.device = str(getattr(model, "device", "cpu"))
        if self.device == "cpu":
            _cpu_threads()
        return model, tok, Decoder(model)

    def check(self) -> None:
        self._load()

    def _time_token(self, stage_token: str | None) -> str:
        """What goes before the prompt: a run's time token (the given one, else its last stage's);
        nothing for a plain model, which knows no time tokens."""
        if self.run_stages is None:
            return ""
        tokens = [s["token"] for s in self.run_stages]
        if stage_token is None:
            return tokens[-1]
        if stage_token not in tokens:
            raise FatalError(f"run {self.model} has no time token {stage_token} (it knows {', '.join(tokens)})")
        return stage_token

    def prompt_tokens(self, messages: list[Message], stage_token: str | None = None) -> int:
        from persllm_cli.model.chat_format import prompt_ids

        _, tok, _ = self._load()
        return len(prompt_ids(tok, messages, self._time_token(stage_token)))

    def complete(self, messages: list[Message], *, max_tokens: int, temperature: float,
                 sections: list[str] | None = None, stage_token: str | None = None,
                 stop: threading.Event | None = None) -> Completion:
        import time

        from persllm_cli.model.guided import free_reply, guided_reply
        from persllm_cli.model.chat_format import has_chat_template, prompt_ids

        model, tok, decoder = self._load()
        eos = {i for i in (tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>"))
               if isinstance(i, int) and i != tok.unk_token_id}
        with self._lock:
            t0 = time.perf_counter()
            prompt = prompt_ids(tok, messages, self._time_token(stage_token))
            decoder.stop = stop
            try:
                if sections:
                    out = guided_reply(decoder, tok, prompt, sections, max_tokens=max_tokens,
                                       temperature=temperature, eos=eos)
                else:
                    out = free_reply(decoder, tok, prompt, max_tokens=max_tokens, temperature=temperature, eos=eos,
                                     stop=None if has_chat_template(tok) else "\nUser:")
            finally:
                decoder.stop = None
            return Completion(text=out.text, prompt_tokens=len(prompt) + out.label_tokens,
                              completion_tokens=out.generated, seconds=time.perf_counter() - t0, model=self.model)


def _cpu_threads() -> None:
    """Threads for CPU generation: the cores this process may use (torch counts the machine's),
    less those other work keeps busy, at least one; OMP_NUM_THREADS, when set, decides instead.
    On a shared 2-core machine with a load of 4, one thread generated 5x faster than two."""
    import os

    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        return
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = max(0.0, os.getloadavg()[0] - 1)   # less our own loading of the model
    except OSError:
        busy = 0.0
    free = max(1, round(allowed - busy))
    torch.set_num_threads(max(1, min(torch.get_num_threads(), allowed, free)))


BACKENDS = ("openai", "local")  # what make_backend builds; the settings' choices of --backend


def make_backend(kind: str, model: str | None, base_url: str | None = None, timeout: float = 120.0) -> Backend:
    """'openai' (model required) or 'local' (default the embedded smollm2-135m)."""
    if kind == "openai":
        if not model:
            raise PersllmError("--backend openai needs --model (or model in [annotate] of persllm.toml)")
        return OpenAIBackend(model, base_url=base_url, timeout=timeout)
    if kind == "local":
        return LocalBackend(model or "smollm2-135m")
    raise PersllmError(f"unknown backend {kind!r} (use openai or local)")

"""The "openai" provider: any OpenAI-compatible chat server through the `openai` package.

The key comes from OPENAI_API_KEY only and is never stored, logged or put in an error message.

Timeouts measure silence, not length: replies stream, and a reply is given up only when no token
has come for `timeout` seconds, or when the first token has not come within `first_token_timeout`
(default `first_token_limit(timeout)`: at least 5 minutes, for a server that reads a long prompt
slowly or queues requests behind others). A slow answer that keeps coming is never thrown away.
A token is a chunk that carries output or a finish reason (`news`): servers that queue (transformers
serve, among others) answer a waiting request at once with a chunk holding only the role and then say
nothing until its turn, so that chunk, empty deltas, comments and keep-alives leave the first-token
limit running. The stream is read as raw server-sent events (`_chunks`) under a watchdog
(watchdog.py).
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Iterator

from persllm_cli.data.records import Message
from persllm_cli.llm.protocol import (Completion, FatalError, RequestError, TransientError, estimate_prompt_tokens,
                                      estimate_tokens, redact_url)
from persllm_cli.llm.watchdog import Watch, Watchdog

OPENAI_URL = "https://api.openai.com/v1"   # where the client goes without a base URL


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


def first_token_limit(timeout: float) -> float:
    """How long to wait for a reply's first token: generous, because a server on a CPU may read a
    long prompt for minutes, or hold the request in its queue while it answers others."""
    return max(300.0, 5 * timeout)


def _response_type() -> type:
    """The HTTP response class of the openai client's HTTP library (httpx, or httpx2 in its later
    versions; the one openai has loaded): `client.post(..., cast_to=it)` returns the response itself."""
    import sys

    for name in ("httpx2", "httpx"):
        if name in sys.modules:
            return sys.modules[name].Response
    import httpx

    return httpx.Response


# What in a chunk's delta is the model's output (not the role or an empty keep-alive): text, the
# reasoning some servers stream apart (llama.cpp, vLLM, DeepSeek), tool calls, a refusal.
_OUTPUT_FIELDS = ("content", "reasoning_content", "reasoning", "tool_calls", "refusal")


def news(chunk: dict[str, Any]) -> str | None:
    """What a streamed chunk says of the model's work on this reply: "output" (text, reasoning,
    tool calls), "finish" (a finish reason and nothing else), or None: a chunk with only the role,
    an empty delta or only usage says nothing (a queued request gets one at once)."""
    finish = None
    for choice in chunk.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta")
        if isinstance(delta, dict) and any(delta.get(k) for k in _OUTPUT_FIELDS):
            return "output"
        if choice.get("finish_reason"):
            finish = "finish"
    return finish


# Reasoning models take max_completion_tokens instead of max_tokens.
_REASONING_PREFIXES = ("o1", "o3", "o4", "gpt-5")


def chat_body(model: str, messages: list[Message], max_tokens: int, temperature: float) -> dict[str, Any]:
    """The body of one chat completion request, as every request to an OpenAI-compatible server
    has it: sent live (streamed) by OpenAIBackend, or written as a batch line (batch.py)."""
    body: dict[str, Any] = {"model": model, "messages": messages}
    if model.startswith(_REASONING_PREFIXES):
        body["max_completion_tokens"] = max_tokens
    else:
        body["max_tokens"] = max_tokens
        body["temperature"] = temperature
    return body


class OpenAIBackend:
    """Any OpenAI-compatible chat server through the `openai` package (sync client, thread-safe).

    The client never retries by itself (`max_retries=0`): the runner owns retries, backoff and
    accounting. The key is read from OPENAI_API_KEY, kept in the client only, and scrubbed from
    every message this class raises.

    Replies are streamed: `timeout` is the longest silence between two chunks, `first_token_timeout`
    the longest wait for the first one (see the module's docstring). `received` counts the chunks
    (about one token each) that have arrived, and `streaming` the requests whose reply is coming
    in now, for progress displays and the runner's adaptive limit. `stream=False` asks for whole
    replies instead, with `timeout` bounding each read (the behaviour before streaming).
    """

    name = "openai"
    in_process = False   # a request in flight is left to die with the process (no torch in it)

    def __init__(self, model: str, base_url: str | None = None, timeout: float = 120.0, *,
                 first_token_timeout: float | None = None, stream: bool = True):
        import os

        self.model = model
        self.timeout = timeout
        self.first_token_timeout = first_token_timeout if first_token_timeout is not None else first_token_limit(timeout)
        self.streamed = stream
        self.received = 0        # chunks received so far, all requests together
        self.streaming = 0       # requests whose first chunk has come and whose last has not
        self._counts = threading.Lock()
        self._watchdog = Watchdog()
        self._stream_usage = True   # ask for usage in the stream until a server refuses the option
        self._first_token = threading.local()   # this thread's last wait for a first chunk
        self._key = os.environ.get("OPENAI_API_KEY", "")
        if not self._key.strip():
            raise FatalError("OPENAI_API_KEY is not set; export your key (it is read only from the "
                             "environment, never from a flag)")
        self.base_url = base_url or os.environ.get("OPENAI_BASE_URL") or None
        self.where = redact_url(self.base_url) if self.base_url else OPENAI_URL
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
            return TransientError(f"request timed out ({self.where})", kind="timeout")
        if isinstance(e, o.APIConnectionError):
            return TransientError(f"cannot connect to {self.where}", kind="overload")
        if isinstance(e, o.APIStatusError):
            status = e.status_code
            retry = _retry_after(getattr(e.response, "headers", None))
            if isinstance(e, o.RateLimitError) or status == 429:
                return TransientError(f"rate limited (429): {self._message(e)}", retry_after=retry, kind="overload")
            if status >= 500 or status == 408 or status == 409:
                kind = "overload" if status in (502, 503, 504, 529) else "timeout" if status == 408 else "other"
                return TransientError(f"server error ({status}): {self._message(e)}", retry_after=retry, kind=kind)
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
        return chat_body(self.model, messages, max_tokens, temperature)

    def _timeouts(self) -> Any:
        """httpx timeouts of one request: the read limit is the first-token limit (the wait for
        the reply's headers); silence after the first chunk is the watchdog's to judge."""
        if not self.streamed:
            return self.timeout
        return self._openai.Timeout(self.first_token_timeout, connect=min(self.timeout, 30.0),
                                    write=self.timeout, pool=self.first_token_timeout)

    def _open(self, client: Any, kwargs: dict[str, Any]) -> Any:
        """Send one streamed request; the httpx response, its body unread (read as raw server-sent
        events by `_chunks`). `client.post` (the openai client's documented way to a raw response)
        keeps its auth, errors and retries but skips what cost the most CPU per request: checking
        the typed parameters, and openai's Stream, which builds a pydantic object per chunk."""
        options: dict[str, Any] = {"timeout": self._timeouts(), "security": {"bearer_auth": True}}
        usage = {"stream_options": {"include_usage": True}} if self._stream_usage else {}
        try:
            return client.post("/chat/completions", cast_to=_response_type(), stream=True,
                               body={**kwargs, "stream": True, **usage}, options=options)
        except self._openai.BadRequestError as e:
            if not (usage and "stream_options" in str(e)):
                raise
            self._stream_usage = False   # this server does not know the option: do without
            return client.post("/chat/completions", cast_to=_response_type(), stream=True,
                               body={**kwargs, "stream": True}, options=options)

    def _chunks(self, client: Any, messages: list[Message], max_tokens: int,
                temperature: float) -> Iterator[dict[str, Any]]:
        """The chunks (decoded JSON of each server-sent event) of one streamed completion, under
        the watchdog: TransientError(kind="timeout") when the first chunk has not come within
        `first_token_timeout` or a later one within `timeout`."""
        import json
        import time

        kwargs = self._request(messages, max_tokens, temperature)
        t0 = time.monotonic()
        w = Watch(t0 + self.first_token_timeout)
        self._watchdog.add(w)
        started = False   # a chunk with content has come (the silence clock runs)
        first = last = 0.0   # when the first and the latest of them came
        response = None
        timeout = self.timeout
        monotonic = time.monotonic
        loads = json.loads
        try:
            try:
                response = self._open(client, kwargs)
                w.attach(response)
                if w.expired:   # the deadline passed while the headers came
                    w.cut()
                data: list[str] = []
                for line in response.iter_lines():
                    if w.expired:
                        break
                    if line.startswith("data:"):
                        data.append(line[6:] if line.startswith("data: ") else line[5:])
                        continue
                    if line or not data:
                        continue   # comments (": ping"), event names, ids; a blank line ends an event
                    payload = data[0] if len(data) == 1 else "\n".join(data)
                    data = []
                    if payload.startswith("[DONE]"):
                        break
                    try:
                        chunk = loads(payload)
                    except ValueError:
                        chunk = None
                    if not isinstance(chunk, dict):
                        raise TransientError(f"the server at {self.where} sent a malformed chunk")
                    if chunk.get("error"):
                        raise TransientError(f"the server at {self.where} failed "
                                             f"{'mid-answer' if started else 'before the answer'}: "
                                             f"{self._message_of(chunk['error'])}")
                    said = news(chunk)
                    if said is not None:
                        # Only the model's work starts (and restarts) the silence clock: a queued
                        # request's role chunk says nothing of when its turn comes.
                        last = monotonic()
                        w.deadline = last + timeout
                        if not started:
                            started = True
                            first = last
                            self._first_token.seconds = first - t0
                            with self._counts:
                                self.streaming += 1
                        if said == "output":
                            with self._counts:
                                self.received += 1
                    yield chunk
            except TransientError:
                raise
            except Exception as e:  # noqa: BLE001 - the transport's errors, whichever library
                o = self._openai
                transport = type(e).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "httpcore2")
                if w.expired:
                    pass   # the watchdog cut it: a timeout, said below
                elif (not started and monotonic() - t0 >= 0.99 * self.first_token_timeout
                      and (isinstance(e, o.APITimeoutError) or (transport and "Timeout" in type(e).__name__))):
                    # a read whose limit is the first token's: of the headers, or of the body after
                    # a queued request's role chunk (the transport's timeout came before the watchdog)
                    w.expired = True
                elif started and (isinstance(e, o.APIConnectionError) or transport):
                    raise TransientError(f"the connection to {self.where} broke mid-answer") from None
                elif transport:
                    raise TransientError(f"the connection to {self.where} broke before the answer") from None
                elif isinstance(e, o.APIError):
                    raise self._translate(e) from None
                else:
                    raise
            if w.expired:
                if started:
                    raise TransientError(f"no token from {self.where} for {self.timeout:g} s (--timeout)",
                                         kind="timeout", streamed=last - first)
                raise TransientError(f"no first token from {self.where} within {self.first_token_timeout:g} s",
                                     kind="timeout")
        finally:
            self._watchdog.remove(w)
            if started:
                with self._counts:
                    self.streaming -= 1
            if response is not None:
                try:
                    response.close()
                except Exception:  # noqa: BLE001 - already broken
                    pass

    def _message_of(self, error: Any) -> str:
        msg = error.get("message") if isinstance(error, dict) else error
        return self._scrub(" ".join(str(msg).split()))[:300]

    def stream(self, messages: list[Message], *, max_tokens: int, temperature: float,
               retries: int = 2) -> Iterator[str]:
        """One chat completion as text pieces, as they arrive (for a person watching: `chat`).
        The client retries a failed connection `retries` times; errors are translated like
        `complete`'s (TransientError / FatalError / RequestError), timeouts measure silence."""
        client = self._client.with_options(max_retries=retries)
        for chunk in self._chunks(client, messages, max_tokens, temperature):
            for choice in chunk.get("choices") or ():
                text = (choice.get("delta") or {}).get("content")
                if text:
                    yield text

    def complete(self, messages: list[Message], *, max_tokens: int, temperature: float,
                 sections: list[str] | None = None, stage_token: str | None = None,
                 stop: threading.Event | None = None,
                 on_text: Callable[[str], None] | None = None) -> Completion:
        """One reply. `on_text`, if given, is called with each piece of text as it arrives (a
        person watching the reply come), before the whole Completion is returned."""
        import time

        del sections, stage_token, stop  # a capable API model follows the format in the prompt
        t0 = time.perf_counter()
        if not self.streamed:
            c = self._complete_whole(messages, max_tokens, temperature, t0)
            if on_text is not None and c.text:
                on_text(c.text)
            return c
        pieces: list[str] = []
        usage = None
        model = None
        self._first_token.seconds = None
        for chunk in self._chunks(self._client, messages, max_tokens, temperature):
            model = model or chunk.get("model")
            if chunk.get("usage"):
                usage = chunk["usage"]
            choices = chunk.get("choices")
            if choices:
                text = (choices[0].get("delta") or {}).get("content")
                if text:
                    pieces.append(text)
                    if on_text is not None:
                        on_text(text)
        c = self._completion("".join(pieces), usage, model, messages, time.perf_counter() - t0)
        c.first_token_seconds = self._first_token.seconds
        return c

    def _completion(self, text: str, usage: Any, model: str | None, messages: list[Message],
                    seconds: float) -> Completion:
        """`usage`: the server's (a dict from a stream, an object from a whole reply) or None."""
        if isinstance(usage, dict):
            pt, ct = usage.get("prompt_tokens"), usage.get("completion_tokens")
        else:
            pt, ct = getattr(usage, "prompt_tokens", None), getattr(usage, "completion_tokens", None)
        if pt is not None:
            return Completion(text=text, prompt_tokens=int(pt), completion_tokens=int(ct or 0), seconds=seconds,
                              model=model or self.model, usage="server")
        # servers without usage: estimate, so accounting still adds up
        return Completion(text=text, prompt_tokens=estimate_prompt_tokens(messages),
                          completion_tokens=estimate_tokens(text), seconds=seconds, model=model or self.model,
                          usage="estimate")

    def _complete_whole(self, messages: list[Message], max_tokens: int, temperature: float, t0: float) -> Completion:
        """One reply in a single response (`stream=False`): `timeout` bounds every read."""
        import time

        try:
            resp = self._client.chat.completions.create(**self._request(messages, max_tokens, temperature))
        except self._openai.APIError as e:
            raise self._translate(e) from None
        text = (resp.choices[0].message.content or "") if resp.choices else ""
        return self._completion(text, resp.usage, resp.model, messages, time.perf_counter() - t0)



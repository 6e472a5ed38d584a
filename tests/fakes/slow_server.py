"""A slow local OpenAI-compatible server, as people run on a laptop (llama.cpp, Ollama on a CPU).

- It generates `slots` replies at a time (default one); other requests wait in its queue, their
  connections open, until a slot frees up.
- Tokens come at `rate` per second, after `prompt_seconds` of reading the prompt; a streamed reply
  sends each token as it is made (headers with the first one, as Ollama does), a whole reply is
  sent when the last token is made.
- `announce`: a streamed request gets its headers and a chunk holding only the role at once, even
  while it waits in the queue, then nothing until its turn (as transformers serve does);
  `keepalive` seconds apart it also sends, while queued, an SSE comment and a chunk with an empty
  delta by turns (as some proxies and servers do to keep a connection open).
- A request whose client has gone away is still generated to the end, as some servers do: the
  server only notices when a write fails, and keeps working anyway (a queued one too, in its turn).
  `cancel_gone`: the server notices at once and drops it instead, queued or generating (as
  transformers serve 5.25 does).
- `max_queue`, when set, answers 503 at once to a request that would wait behind that many others.
- `stall_first`: the first that many generations go silent for `stall_seconds` after
  `stall_after` tokens (a server busy elsewhere), then go on.

    with SlowOpenAI(tokens=300, rate=10) as fake:
        ... base_url=fake.url, key=fake.api_key ...
        fake.started, fake.finished, fake.abandoned, fake.refused   # generations and answers

Listens on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.fakes.openai_server import DEFAULT_KEY, LocalServer


def reply_tokens(body: dict[str, Any], n: int, tokens: int) -> list[str]:
    """A well-formed annotator reply of `tokens` pieces (at least the eight of its frame): labelled
    question, analysis when the prompt asks for one, and an answer padded with words."""
    prompt = "\n".join(str(m.get("content", "")) for m in body.get("messages", []))
    pieces = ["[Question]\n", "What ", "about ", f"{n}?\n"]
    if "[Analysis]" in prompt:
        pieces += ["[Analysis]\n", "Thinking.\n"]
    pieces += ["[Response]\n", "Well, "]
    filler = ["I ", "remember ", "it ", "well, ", "every ", "part ", "of ", "it, ", "and "]
    i = 0
    while len(pieces) < tokens:
        pieces.append(filler[i % len(filler)])
        i += 1
    return pieces


@dataclass
class SlowOpenAI(LocalServer):
    tokens: int = 300
    rate: float = 10.0
    prompt_seconds: float = 0.0
    slots: int = 1
    max_queue: int | None = None
    stall_first: int = 0
    stall_after: int = 2
    stall_seconds: float = 0.0
    announce: bool = False
    keepalive: float = 0.0
    cancel_gone: bool = False
    api_key: str = DEFAULT_KEY
    models: tuple[str, ...] = ("gpt-4o-mini", "fake-model")
    started: int = 0          # generations begun
    finished: int = 0         # generations run to their last token (answered or not)
    abandoned: int = 0        # generations whose client had gone away before the last token
    dropped: int = 0          # requests dropped because their client had gone (cancel_gone)
    refused: int = 0          # requests answered 503 (max_queue)
    received: int = 0         # completion requests that arrived
    busy_seconds: float = 0.0  # time with at least one generation running (the server's own time)
    max_waiting: int = 0      # most requests in the server at once (generating + queued)
    events: list[tuple[float, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._slots = threading.Semaphore(self.slots)
        self._waiting = 0
        self._running = 0
        self._busy_since = 0.0
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the server first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def answer_seconds(self) -> float:
        """The server's own time for one answer."""
        return self.prompt_seconds + self.tokens / self.rate

    def _note(self, what: str) -> None:
        self.events.append((time.monotonic(), what))

    def _begin(self) -> int:
        with self._lock:
            self.started += 1
            if self._running == 0:
                self._busy_since = time.monotonic()
            self._running += 1
            self._note("start")
            return self.started

    def _end(self, gone: bool, dropped: bool = False) -> None:
        with self._lock:
            self.finished += not dropped
            self.abandoned += gone
            self.dropped += dropped
            self._running -= 1
            if self._running == 0:
                self.busy_seconds += time.monotonic() - self._busy_since
            self._note("end")

    def start(self) -> "SlowOpenAI":
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, *args: Any) -> None:
                pass

            def _json(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.headers.get("Authorization", "") != f"Bearer {fake.api_key}":
                    return self._json(401, {"error": {"message": "Incorrect API key provided"}})
                self._json(200, {"object": "list", "data": [
                    {"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in fake.models]})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                if self.headers.get("Authorization", "") != f"Bearer {fake.api_key}":
                    return self._json(401, {"error": {"message": "Incorrect API key provided"}})
                with fake._lock:
                    fake.received += 1
                    if fake.max_queue is not None and fake._waiting >= fake.slots + fake.max_queue:
                        fake.refused += 1
                        refuse = True
                    else:
                        refuse = False
                        fake._waiting += 1
                        fake.max_waiting = max(fake.max_waiting, fake._waiting)
                        n_request = fake.received
                if refuse:
                    self.close_connection = True
                    return self._json(503, {"error": {"message": "server busy, try again later"}})
                out = _Stream(self, body, n_request)
                try:
                    if out.streamed and fake.announce:
                        out.chunk({"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]})
                        beat = 0
                        while not fake._slots.acquire(timeout=fake.keepalive or None):
                            out.keep_alive(beat)
                            beat += 1
                    else:
                        fake._slots.acquire()
                    try:
                        if fake.cancel_gone and out.left():
                            with fake._lock:
                                fake.dropped += 1   # dropped in the queue: never generated
                        else:
                            self._generate(body, out)
                    finally:
                        fake._slots.release()
                finally:
                    with fake._lock:
                        fake._waiting -= 1

            def _generate(self, body: dict[str, Any], out: "_Stream") -> None:
                n = fake._begin()
                pieces = reply_tokens(body, n, fake.tokens)
                t0 = time.monotonic() + fake.prompt_seconds
                stall_at = fake.stall_after if n <= fake.stall_first else -1
                for i, piece in enumerate(pieces):
                    if i == stall_at:
                        t0 += fake.stall_seconds
                    delay = t0 + (i + 1) / fake.rate - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    if fake.cancel_gone and (out.gone or out.left()):
                        self.close_connection = True
                        return fake._end(True, dropped=True)
                    if out.streamed:
                        delta = {"role": "assistant", "content": piece} if i == 0 and not out.opened else {"content": piece}
                        out.chunk({"choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
                text = "".join(pieces)
                prompt = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
                usage = {"prompt_tokens": prompt, "completion_tokens": len(pieces),
                         "total_tokens": prompt + len(pieces)}
                if out.streamed:
                    out.chunk({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
                    if (body.get("stream_options") or {}).get("include_usage"):
                        out.chunk({"usage": usage})
                    out.end()
                else:
                    try:
                        self._json(200, {"id": f"chatcmpl-slow-{n}", "object": "chat.completion",
                                         "created": int(time.time()), "model": body.get("model"),
                                         "choices": [{"index": 0, "finish_reason": "stop",
                                                      "message": {"role": "assistant", "content": text}}],
                                         "usage": usage})
                    except OSError:
                        out.gone = True
                if out.gone:
                    self.close_connection = True
                fake._end(out.gone)

        self._serve(Handler)
        return self


class _Stream:
    """One streamed reply as chunked server-sent events: the headers go with the first write, and a
    write that fails marks the client gone (the server goes on all the same)."""

    def __init__(self, handler: BaseHTTPRequestHandler, body: dict[str, Any], n: int):
        self.handler = handler
        self.body = body
        self.id = f"chatcmpl-slow-{n}"
        self.streamed = bool(body.get("stream"))
        self.opened = False   # the headers have been sent
        self.gone = False

    def write(self, data: bytes) -> None:
        if self.gone:
            return
        h = self.handler
        try:
            if not self.opened:
                self.opened = True
                h.send_response(200)
                h.send_header("Content-Type", "text/event-stream")
                h.send_header("Transfer-Encoding", "chunked")
                h.end_headers()
            h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            h.wfile.flush()
        except OSError:   # the client has gone away
            self.gone = True

    def left(self) -> bool:
        """Whether the client has closed its end (the socket reads as at its end), without a write."""
        import select
        import socket

        conn = self.handler.connection
        try:
            if not select.select([conn], [], [], 0)[0]:
                return False
            return conn.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def chunk(self, payload: dict[str, Any]) -> None:
        base = {"id": self.id, "object": "chat.completion.chunk", "created": int(time.time()),
                "model": self.body.get("model"), "choices": []}
        self.write(f"data: {json.dumps({**base, **payload})}\n\n".encode())

    def keep_alive(self, beat: int) -> None:
        """A comment or an empty delta, by turns: neither is a token."""
        if beat % 2 == 0:
            self.write(b": keep-alive\n\n")
        else:
            self.chunk({"choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": None}]})

    def end(self) -> None:
        self.write(b"data: [DONE]\n\n")
        if not self.gone:
            try:
                self.handler.wfile.write(b"0\r\n\r\n")
                self.handler.wfile.flush()
            except OSError:
                self.gone = True

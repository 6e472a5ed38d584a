"""A local fake OpenAI-compatible server for tests and benchmarks (127.0.0.1 only, never the network).

It answers POST /v1/chat/completions (streamed as server-sent events when the request asks for
`stream`), GET /v1/models, and the Batch API's /v1/files and /v1/batches (batches.py) like the
real API, with switches for what
real servers do to clients: latency, 429 with Retry-After, 500, malformed answers, a wrong key, an
unknown model. Every request is logged (headers and body) so tests can assert on what was sent.

    with FakeOpenAI(latency=0.3) as fake:
        fake.push(Fail(429, retry_after=1), Fail(500), Malformed())   # the next three requests
        ... base_url=fake.url, key=fake.api_key ...
        fake.requests  # what arrived
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from tests.fakes.batches import BatchStore

DEFAULT_KEY = "sk-fake-test-key-0123456789"


@dataclass
class Fail:
    """Answer the next request with an HTTP error."""

    status: int
    retry_after: float | None = None
    message: str = "fake failure"


@dataclass
class Malformed:
    """Answer the next request with 200 but a reply that has no [Response] section."""

    text: str = "I am not following the format at all."


@dataclass
class Reply:
    """Answer the next request with exactly this text."""

    text: str


@dataclass
class Hang:
    """Wait this many seconds before answering normally (for client timeouts)."""

    seconds: float


@dataclass
class Stall:
    """Stream the next reply's first piece, then go silent this many seconds before the rest
    (for the silence timeout; a request that is not streamed just waits this long)."""

    seconds: float


@dataclass
class Logged:
    time: float
    path: str
    headers: dict[str, str]
    body: dict[str, Any] | None
    status: int = 0


def default_responder(body: dict[str, Any], n: int) -> str:
    """A well-formed annotator reply built from the request, different for every request."""
    prompt = "\n".join(str(m.get("content", "")) for m in body.get("messages", []))
    words = re.findall(r"[A-Za-z]{4,}", prompt)
    topic = words[-1] if words else "this"
    parts = [f"[Question]\nWhat happened with {topic} (question {n})?"]
    if "[Analysis]" in prompt:
        parts.append(f"[Analysis]\nHe would think about {topic} carefully, as item {n}.")
    parts.append(f"[Response]\nWell, about {topic}: it mattered to me, and I remember it (answer {n}).")
    return "\n".join(parts)


def _usage(body: dict[str, Any], text: str) -> dict[str, int]:
    """Token counts as the fake counts them: words."""
    prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
    completion_tokens = len(text.split())
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass   # a client closing a connection (kept alive, or mid-request) is normal here, not a traceback


class LocalServer:
    """start() / stop() / `with` for a fake server on 127.0.0.1, on a free port."""

    _server: ThreadingHTTPServer | None = None

    def start(self):  # noqa: ANN201 - returns the subclass
        raise NotImplementedError

    def _serve(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self._server = QuietServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self):  # noqa: ANN204 - returns the subclass
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class FakeOpenAI(LocalServer):
    latency: float = 0.0
    api_key: str = DEFAULT_KEY
    models: tuple[str, ...] = ("gpt-4o-mini", "gpt-4-turbo", "fake-model")
    responder: Callable[[dict[str, Any], int], str] = default_responder
    requests: list[Logged] = field(default_factory=list)
    usage: bool = True   # False: never send token counts (servers that do not, even when asked)
    # The Batch API (batches.py): how long a new batch validates, then runs; the limits per file.
    batch_validate_seconds: float = 0.1
    batch_run_seconds: float = 0.5
    batch_max_requests: int = 50_000
    batch_max_bytes: int = 200 * 1024 * 1024
    batch_api: bool = True   # False: /files and /batches answer 404, as on a server without them

    def __post_init__(self) -> None:
        self._script: deque = deque()
        self._lock = threading.Lock()
        self._count = 0
        # Cleared by a test to hold every chat request where it is (after its latency) until set again:
        # a run that must still be writing when something else happens, however slow the machine.
        self.gate = threading.Event()
        self.gate.set()
        self.batches = BatchStore(self._batch_answer, self._next_action, self.batch_validate_seconds,
                                  self.batch_run_seconds, self.batch_max_requests, self.batch_max_bytes)

    def _next_action(self) -> Any:
        with self._lock:
            self._count += 1
            return self._script.popleft() if self._script else None

    def answer(self, body: dict[str, Any], n: int, action: Any) -> tuple[int, Any]:
        """What chat request number `n` gets: (200, the reply's text) or (status, an error body)."""
        if body.get("model") not in self.models:
            return 404, {"error": {"message": f"The model `{body.get('model')}` does not exist",
                                   "type": "invalid_request_error", "code": "model_not_found"}}
        if isinstance(action, Fail):
            return action.status, {"error": {"message": action.message, "type": "fake_error", "code": None}}
        return 200, action.text if isinstance(action, (Malformed, Reply)) else self.responder(body, n)

    def _batch_answer(self, body: dict[str, Any], action: Any) -> tuple[int, dict[str, Any]]:
        """One batch line, answered as the same request sent alone (not streamed) would be."""
        with self._lock:
            n = self._count
        status, out = self.answer(body, n, action)
        return (200, self.completion(body, n, out)) if status == 200 else (status, out)

    def completion(self, body: dict[str, Any], n: int, text: str) -> dict[str, Any]:
        """A whole (not streamed) chat completion with this text."""
        return {
            "id": f"chatcmpl-fake-{n}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model"),
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
            **({"usage": _usage(body, text)} if self.usage else {}),
        }

    # -- control
    def push(self, *actions: Fail | Malformed | Reply | Hang | Stall) -> None:
        with self._lock:
            self._script.extend(actions)

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the server first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def completions(self) -> list[Logged]:
        return [r for r in self.requests if r.path.endswith("/chat/completions")]

    def start(self) -> "FakeOpenAI":
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Answer at once: without this, Nagle + delayed ACK add ~40 ms to every keep-alive reply.
            disable_nagle_algorithm = True

            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _stream(self, n: int, model: str, text: str, usage: dict[str, int] | None,
                        stall: float = 0.0) -> None:
                """Server-sent events as the real API streams them (chunked, so the connection is
                kept alive): a chunk per word, the usage chunk when asked for, then [DONE].

                Without a stall the whole response (headers, events, the last chunk) goes out in
                one write: the fake is the benchmarks' server, and a write + flush per word made
                it, not the client, the cost measured."""
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self._headers_buffer.append(b"\r\n")   # end_headers() without its write: see below
                head = f'{{"id": "chatcmpl-fake-{n}", "object": "chat.completion.chunk", ' \
                       f'"created": {int(time.time())}, "model": {json.dumps(model)}, '

                def event(delta: dict[str, Any] | None, finish: str | None, extra: str = "") -> bytes:
                    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
                    return f'data: {head}"choices": {json.dumps(choices)}{extra}}}\n\n'.encode()

                def send(data: bytes, end: bytes = b"") -> None:
                    """One write: the headers not yet sent, this chunk, and `end`."""
                    headers = b"".join(self._headers_buffer)
                    self._headers_buffer = []
                    self.wfile.write(b"%s%x\r\n%s\r\n%s" % (headers, len(data), data, end))
                    self.wfile.flush()

                pieces = re.findall(r"\S+\s*|\s+", text)
                events = [event({"role": "assistant", "content": p} if i == 0 else {"content": p}, None)
                          for i, p in enumerate(pieces)]
                events.append(event({}, "stop"))
                if usage is not None:
                    events.append(event(None, None, f', "usage": {json.dumps(usage)}'))
                events.append(b"data: [DONE]\n\n")
                if stall and events:
                    send(events[0])
                    time.sleep(stall)
                    events = events[1:]
                send(b"".join(events), b"0\r\n\r\n")

            def _error(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None) -> None:
                self._send(status, {"error": {"message": message, "type": "fake_error", "code": code}}, headers)

            def _authorized(self) -> bool:
                return self.headers.get("Authorization", "") == f"Bearer {fake.api_key}"

            def do_GET(self) -> None:
                entry = Logged(time.time(), self.path, dict(self.headers), None)
                with fake._lock:
                    fake.requests.append(entry)
                if not self._authorized():
                    entry.status = 401
                    return self._error(401, "Incorrect API key provided", "invalid_api_key")
                if self.path.rstrip("/").endswith("/models"):
                    entry.status = 200
                    return self._send(200, {"object": "list", "data": [
                        {"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in fake.models]})
                m = re.search(r"/files/([^/?]+)(/content)?$", self.path) or re.search(r"/batches(?:/([^/?]+))?$", self.path)
                if m and not fake.batch_api:
                    m = None
                if m and "/files/" in self.path:
                    entry.status, payload = fake.batches.file(m.group(1), content=bool(m.group(2)))
                    if isinstance(payload, bytes):
                        return self._raw(payload)
                    return self._send(entry.status, payload)
                if m:
                    entry.status, payload = fake.batches.get(m.group(1)) if m.group(1) else fake.batches.list()
                    return self._send(entry.status, payload)
                entry.status = 404
                self._error(404, "not found")

            def _raw(self, data: bytes) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw or b"{}")
                except ValueError:   # not JSON (or not text: an uploaded file's multipart body)
                    body = None
                entry = Logged(time.time(), self.path, dict(self.headers), body)
                with fake._lock:
                    fake.requests.append(entry)
                if re.search(r"/(files|batches)(/[^/]+/cancel)?$", self.path):
                    return self._batch_api(raw, body, entry)
                with fake._lock:
                    fake._count += 1
                    n = fake._count
                    action = fake._script.popleft() if fake._script else None
                if fake.latency:
                    time.sleep(fake.latency)
                fake.gate.wait(timeout=120)
                if isinstance(action, Hang):
                    time.sleep(action.seconds)
                    action = None
                stall = 0.0
                if isinstance(action, Stall):
                    stall, action = action.seconds, None
                    if not (body or {}).get("stream"):
                        time.sleep(stall)
                if not self._authorized():
                    entry.status = 401
                    return self._error(401, "Incorrect API key provided", "invalid_api_key")
                if not self.path.endswith("/chat/completions") or body is None:
                    entry.status = 404
                    return self._error(404, "not found")
                entry.status, text = fake.answer(body, n, action)
                if entry.status != 200:
                    retry = getattr(action, "retry_after", None)
                    return self._send(entry.status, text, {"Retry-After": str(retry)} if retry is not None else None)
                if body.get("stream"):
                    wants_usage = fake.usage and (body.get("stream_options") or {}).get("include_usage")
                    return self._stream(n, body["model"], text, _usage(body, text) if wants_usage else None, stall)
                self._send(200, fake.completion(body, n, text))

            def _batch_api(self, raw: bytes, body: Any, entry: Logged) -> None:
                """POST /files, /batches, /batches/{id}/cancel (batches.py)."""
                is_json = not self.path.endswith("/files")
                if not self._authorized():
                    entry.status = 401
                    return self._error(401, "Incorrect API key provided", "invalid_api_key")
                if not fake.batch_api:
                    entry.status = 404
                    return self._error(404, "Invalid URL (POST " + self.path + ")")
                if is_json and not isinstance(body, dict):
                    entry.status = 400
                    return self._error(400, "We could not parse the JSON body of your request.")
                if self.path.endswith("/files"):
                    entry.status, payload = fake.batches.upload(self.headers.get("Content-Type", ""), raw)
                elif self.path.endswith("/cancel"):
                    entry.status, payload = fake.batches.cancel(self.path.rsplit("/", 2)[-2])
                else:
                    entry.status, payload = fake.batches.create(body)
                self._send(entry.status, payload)

        self._serve(Handler)
        return self


def main() -> None:
    """Run the fake server in the foreground (for subprocess tests and benchmarks)."""
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--latency", type=float, default=0.0)
    ap.add_argument("--batch-run-seconds", type=float, default=0.5, help="how long a batch runs")
    ap.add_argument("--port-file", required=True, help="write the base URL here once listening")
    args = ap.parse_args()
    fake = FakeOpenAI(latency=args.latency, batch_run_seconds=args.batch_run_seconds).start()
    with open(args.port_file + ".tmp", "w") as f:
        f.write(fake.url)
    import os

    os.replace(args.port_file + ".tmp", args.port_file)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        fake.stop()


if __name__ == "__main__":
    main()

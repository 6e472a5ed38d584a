"""A batch through an OpenAI-compatible Batch API (`/v1/files`, `/v1/batches`, with the `openai`
package's client.files and client.batches): upload the requests, create the batch, poll it with
progress, download its output and error files and import them (batch.py), in one call.

    imported, outcome = run_batch(b, pending, items, api=BatchApi(backend, ...), state=OpenBatch(path),
                                  fingerprint={...}, poll_seconds=30, budget_usd=None)

The batch a command has open for an output is kept in a small JSON file next to the output
(`<output>.batch.json`: the batch and file ids, the server, the settings that shaped the requests,
the estimate; never a key). A run stopped while the batch runs (Ctrl-C, SIGTERM, a lost
connection) leaves it open at the provider; the next run finds it and polls it again instead of
paying twice. The file goes once the batch's results are imported, or when the batch failed.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from persllm_cli.core import console
from persllm_cli.core.errors import PersllmError
from persllm_cli.data.store import read_text, write_text_atomic
from persllm_cli.llm.batch import ENDPOINT, Batch, Imported, import_results, write_requests
from persllm_cli.llm.openai_compat import OpenAIBackend
from persllm_cli.llm.progress import Estimate
from persllm_cli.llm.protocol import RequestError, TransientError
from persllm_cli.llm.retry import retrying
from persllm_cli.llm.runner import Item

# A batch in one of these states changes no more.
DONE = ("completed", "failed", "expired", "cancelled")
QUIET_LINE_SECONDS = 60.0   # without a live display, a progress line at most this often (or on a new status)


class NotFound(Exception):
    """The server answered 404: no such batch, or no Batch API at all (the caller says which)."""


class BatchApi:
    """The Batch API of the server an OpenAIBackend talks to (its client, key and errors).

    Transient failures (timeouts, connection errors, 429, 5xx) are retried `max_retries` times with
    the live path's backoff, then end the call as one line; a rejected key is one line at once."""

    def __init__(self, backend: OpenAIBackend, *, max_retries: int = 5, backoff: float = 1.0):
        self.backend = backend
        self.where = backend.where
        self.max_retries = max_retries
        self.backoff = backoff
        self.client = backend._client

    def check(self) -> None:
        """Fail fast, before anything is uploaded: no key, a rejected key, no server (FatalError)."""
        self.backend.check()

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        """`fn()`, retried on transient failures; NotFound (404) passes through for the caller."""
        o = self.backend._openai

        def once() -> Any:
            try:
                return fn()
            except o.NotFoundError:
                raise NotFound() from None
            except o.APIError as e:
                raise self.backend._translate(e) from None

        def said(e: TransientError) -> None:
            console.note(f"{what}: {e}; trying again")

        try:
            return retrying(once, max_retries=self.max_retries, base=self.backoff, on_retry=said)
        except (TransientError, RequestError) as e:
            raise PersllmError(f"{what} at {self.where} failed: {e}") from None

    def upload(self, path: Path) -> str:
        def send() -> Any:
            with open(path, "rb") as f:
                return self.client.files.create(file=(path.name, f), purpose="batch")

        try:
            return self._call("uploading the batch file", send).id
        except NotFound:
            raise PersllmError(f"the server at {self.where} has no Batch API (POST /files: 404 not found); "
                               "write the requests with --batch-file instead and run them elsewhere "
                               "(e.g. vllm run-batch), or annotate live") from None

    def create(self, file_id: str, title: str) -> Any:
        try:
            return self._call("creating the batch", lambda: self.client.batches.create(
                input_file_id=file_id, endpoint=ENDPOINT, completion_window="24h", metadata={"persllm": title}))
        except NotFound:
            raise PersllmError(f"the server at {self.where} has no Batch API (POST /batches: 404 not found); "
                               "write the requests with --batch-file instead and run them elsewhere "
                               "(e.g. vllm run-batch), or annotate live") from None

    def retrieve(self, batch_id: str) -> Any | None:
        """The batch, or None when the server does not know it (deleted, or another server)."""
        try:
            return self._call("asking for the batch", lambda: self.client.batches.retrieve(batch_id))
        except NotFound:
            return None

    def download(self, file_id: str, dest: Path) -> Path:
        def fetch() -> None:
            with self.client.files.with_streaming_response.content(file_id) as r:
                r.stream_to_file(dest)

        self._call("downloading the batch's results", fetch)   # NotFound: the file is gone
        return dest


class OpenBatch:
    """The batch open for one output, in `<output>.batch.json` (ids and settings only)."""

    def __init__(self, output: Path):
        output = Path(output)
        self.path = output.with_name(f"{output.name}.batch.json")

    def load(self) -> dict[str, Any] | None:
        text = read_text(self.path, required=False)
        if text is None:
            return None
        try:
            state = json.loads(text)
        except json.JSONDecodeError:
            state = None
        if not isinstance(state, dict) or not isinstance(state.get("batch_id"), str):
            raise PersllmError(f"{self.path}: not a batch record persllm wrote; remove it to start afresh "
                               "(a batch it named keeps running at the provider)")
        return state

    def save(self, state: dict[str, Any]) -> None:
        write_text_atomic(self.path, json.dumps(state, indent=2, ensure_ascii=False) + "\n")

    def clear(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


@contextmanager
def deferred_signals() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block is over: the batch must not be created without its
    id being written down (it would run, and be paid for, with nobody to collect it)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    old = {s: signal.signal(s, lambda signum, frame: got.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if got:
            handler = old[got[0]]
            if callable(handler):
                handler(got[0], None)
            raise KeyboardInterrupt


def _elapsed(created_at: Any) -> str:
    if not isinstance(created_at, (int, float)) or created_at <= 0:
        return "?"
    s = max(0, int(time.time() - created_at))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _poll(api: BatchApi, state: dict[str, Any], poll_seconds: float) -> Any:
    """Ask for the batch every `poll_seconds` until it is done; show its counts as they change."""
    batch_id = state["batch_id"]
    estimate = f"estimate ${state['estimate_usd']:.4f} (at most ${state['most_usd']:.4f})"
    last: tuple[Any, ...] | None = None
    last_time = 0.0
    with console.progress("{task.fields[status]}", "{task.fields[failed]} failed", "{task.fields[since]}",
                          "{task.fields[estimate]}") as bar:
        task = bar.add_task(f"batch {batch_id}", total=state["requests"], status="", failed=0, since="",
                            estimate=estimate)
        while True:
            b = api.retrieve(batch_id)
            if b is None:
                return None
            counts = b.request_counts
            done, failed = (counts.completed, counts.failed) if counts else (0, 0)
            total = (counts.total if counts and counts.total else state["requests"])
            since = _elapsed(b.created_at)
            bar.update(task, completed=done + failed, total=total, status=b.status, failed=failed,
                       since=f"{since} since created")
            now = (b.status, done, failed)
            if not console.live() and now != last and (
                    last is None or now[0] != last[0] or b.status in DONE
                    or time.monotonic() - last_time >= QUIET_LINE_SECONDS):
                console.info(f"batch {batch_id}: {b.status}, {done + failed}/{total} done ({failed} failed), "
                             f"{since} since it was created; {estimate}")
                last, last_time = now, time.monotonic()
            if b.status in DONE:
                return b
            time.sleep(poll_seconds)


def run_batch(b: Batch, pending: list[Item], items: dict[str, Item], *, api: BatchApi, state: OpenBatch,
              fingerprint: dict[str, Any], poll_seconds: float, budget_usd: float | None, skipped: int,
              on_open: Callable[[str], None]) -> tuple[Imported | None, dict[str, Any]]:
    """Send `pending` as one batch (or continue the batch open for `b.output`), wait for it and
    import its results (`items`: all the run's items, by id; `skipped`: how many are done). Returns (what was imported, or None when nothing was to do; an account of
    the batch: its id, status, requests, and items left out for a later batch by the budget or the
    API's limits). `on_open(batch_id)` is told the batch's id once it exists (for Ctrl-C's hint)."""
    api.check()   # a rejected key or no server: one line, exit 1, nothing sent
    open_ = state.load()
    if open_ is not None:
        if open_.get("settings") != fingerprint:
            changed = sorted(k for k in set(fingerprint) | set(open_.get("settings") or {})
                             if fingerprint.get(k) != (open_.get("settings") or {}).get(k))
            raise PersllmError(f"batch {open_['batch_id']} is still open for {b.output} with other settings "
                               f"({', '.join(changed)}): rerun with the settings it was made with to collect it, "
                               f"or remove {state.path} to forget it (it keeps running at the provider)")
        console.info(f"continuing batch {open_['batch_id']} ({open_['requests']} requests, "
                     f"created {open_.get('created', '?')})")
    else:
        if not pending:
            return None, {}
        tmp = state.path.with_name(f".{b.output.name}.batch-input.jsonl")
        try:
            written = write_requests(tmp, b, pending, budget_usd=budget_usd, api_limits=True)
            left_out = written.over_budget + written.over_limits
            if written.estimate.requests == 0:
                raise PersllmError(f"the budget of ${budget_usd} does not cover one request at its worst case "
                                   f"(${b.price.cost(0, b.max_tokens):.4f} or more); raise --budget-usd")
            file_id = api.upload(tmp)
        finally:
            tmp.unlink(missing_ok=True)
        _show(b, written.estimate, skipped, written.over_budget, written.over_limits)
        with deferred_signals():
            created = api.create(file_id, b.title)
            est = written.estimate
            open_ = {"batch_id": created.id, "input_file_id": file_id, "server": api.where, "model": b.model,
                     "requests": est.requests, "estimate_usd": round(est.typical_usd, 6),
                     "most_usd": round(est.most_usd, 6), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                     "left_out": left_out, "settings": fingerprint}
            state.save(open_)
        console.info(f"created batch {created.id}: {est.requests} requests to {api.where}")
    on_open(open_["batch_id"])
    done = _poll(api, open_, poll_seconds)
    if done is None:
        state.clear()
        raise PersllmError(f"the server at {api.where} does not know batch {open_['batch_id']} (deleted, or another "
                           "server); forgot it: rerun to send the requests in a new batch")
    if done.status == "failed":
        state.clear()
        errors = [f"line {e.line}: {e.message}" if e.line else str(e.message)
                  for e in ((done.errors.data or []) if done.errors else [])]
        raise PersllmError(f"the server refused batch {done.id}: " + ("; ".join(errors[:3]) or "no reason given")
                           + (f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""))
    paths = []
    try:
        for n, file_id in enumerate((done.output_file_id, done.error_file_id)):
            if file_id:
                dest = state.path.with_name(f".{b.output.name}.batch-{'output' if n == 0 else 'errors'}.jsonl")
                try:
                    paths.append(api.download(file_id, dest))
                except NotFound:   # gone for good (servers keep a batch's files for a while)
                    console.warn(f"the server at {api.where} no longer has file {file_id} of batch {done.id}'s "
                                 "results (404): its requests are still to do")
        imported = import_results(paths, b, items) if paths else Imported()
    finally:
        for p in paths:
            p.unlink(missing_ok=True)
    state.clear()
    counts = done.request_counts
    return imported, {"batch_id": done.id, "status": done.status, "requests": open_["requests"],
                      "answered": (counts.completed + counts.failed) if counts else None,
                      "left_out": open_.get("left_out", 0)}


def _show(b: Batch, est: Estimate, skipped: int, over_budget: int, over_limits: int) -> None:
    console.table(f"batch: {b.model}, at the batch price", ["", "value"], est.rows(skipped))
    if over_budget:
        console.warn(f"{over_budget} request(s) left for a later batch: with them the worst case would pass "
                     "--budget-usd")
    if over_limits:
        console.warn(f"{over_limits} request(s) left for a later batch: one batch file holds at most 50,000 "
                     "requests and 200 MB")


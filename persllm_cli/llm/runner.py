"""One concurrent runner for every stage that asks a Backend for text (annotate, dpo --mode
generate, eval): worker threads, retries with backoff, accounting, a budget, resume, Ctrl-C.

    stats = run_items(items, backend, build_messages=..., parse=..., make_record=..., output=path,
                      settings=RunnerSettings(concurrency=8, max_retries=5, ...), price=Price(0.15, 0.6),
                      spend=Spend(budget_usd=2.0))

- `items` carry a stable `id`; ids whose last record in `output` is `ok` are skipped, failed ones
  are tried again (resume). `limit` caps the new records of this run.
- `build_messages(item)` is called before every attempt (so standards added mid-run apply);
  `parse(item, completion)` returns what `make_record` needs or raises `Malformed` (retried like a
  transient error); `make_record(item, parsed_or_None, Usage, error_or_None)` builds the record.
  `request_options(item)`, if given, returns the optional hints for `Backend.complete`
  (`sections`, `stage_token`).
- One writer (the main thread) appends each record and flushes it (records.Appender): kill -9
  loses only requests in flight, never a written record, and never writes one twice.
- Retries: exponential backoff with full jitter, `Retry-After` honoured (retry.py, the policy of
  every API request). `TransientError` and `Malformed` are retried up to `max_retries` times,
  then the item is written `failed`.
  `RequestError` fails the item at once. `FatalError` stops the run; before the first success
  nothing is written at all (the caller exits 1 with one line).
- Adaptive limit: at most `concurrency` requests are in flight, fewer while the server shows it
  cannot keep up. A timeout or an overload answer (429, 503, connection refused) cuts the limit
  (to half, and to no more than the replies still streaming, so a server that answers one request
  at a time gets one at a time) before the request is retried; each success grows it back by
  1/limit (one more request in flight per `limit` successes), unless its first token took more
  than half the backend's first-token limit (requests wait in the server's queue nearly as long
  as we allow: more of them would time out). One cut per round of requests: the requests already
  in flight when the limit was cut do not cut it again.
- Given-up generations (ghosts.py): a server that does not stop generating for a client that
  timed out keeps working on the request; it keeps its place under the limit for as long as the
  server would take to finish it at the run's pace, so the retry is not sent to wait behind it.
  One request sent past such ghosts tells whether the server drops them instead.
- When requests keep timing out or being refused, one warning line says so and names the knobs
  (--timeout, --concurrency, --max-tokens), once per run. The progress shows tokens arriving
  (progress.py: what a run shows, its RunStats and the end table).
- Budget: `spend` (pricing.Spend) is the command's account; what its `budget_usd` leaves limits
  this run, and the run's requests, tokens and dollars are charged to it. Before each attempt the
  worst case of that request (estimated prompt + max_tokens) is reserved; if it could pass what is
  left, nothing more is sent and the run stops cleanly.
- Ctrl-C: nothing more is sent, what is written stays written, KeyboardInterrupt propagates (130).
  An in-process backend (torch) is stopped between tokens and its workers joined first: a thread
  still inside torch when the interpreter exits aborts the process (exit 134).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from persllm_cli.core import console
from persllm_cli.core.errors import Stopped
from persllm_cli.data.records import Message, Record
from persllm_cli.data.store import Appender, resume_state
from persllm_cli.llm.inflight import InFlight
from persllm_cli.llm.pricing import Price, Spend
from persllm_cli.llm.progress import Arriving, RunStats, trouble_line
from persllm_cli.llm.protocol import Backend, Completion, FatalError, RequestError, TransientError
from persllm_cli.llm.retry import BACKOFF_MAX, backoff


class Malformed(Exception):
    """The reply came back but is unusable (no answer section, empty text): retry it."""


@dataclass
class Item:
    id: str
    data: Any = None


@dataclass
class Usage:
    """What one item cost over all its attempts (goes into the record's `annotator`)."""

    backend: str
    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    attempts: int = 0
    seconds: float = 0.0

    def add(self, c: Completion, cost: float) -> None:
        """Count one reply that came back (paid for, usable or not)."""
        self.prompt_tokens += c.prompt_tokens
        self.completion_tokens += c.completion_tokens
        self.cost_usd += cost
        self.seconds += c.seconds

    def as_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "model": self.model, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "cost_usd": round(self.cost_usd, 6),
                "attempts": self.attempts, "seconds": round(self.seconds, 3)}


def read_reply(item: Item, c: Completion, parse: Callable[[Item, Completion], Any]) -> tuple[Any, str | None]:
    """What a reply gives its item: (parsed, None), or (None, why) for a malformed one. The live
    runner retries the second kind; a batch result (batch.py) has no retry and records it failed."""
    try:
        return parse(item, c), None
    except Malformed as e:
        return None, f"malformed reply: {e}"


def failure_reason(error: str | None) -> str:
    """The kind of a failed item's error, for the counts by reason ("rate limited (429)", ...)."""
    return (error or "failed").split(":")[0].split(" (after")[0]


@dataclass
class RunnerSettings:
    concurrency: int = 8
    max_retries: int = 5
    max_tokens: int = 1024
    temperature: float = 0.7
    limit: int | None = None
    backoff_base: float = 1.0    # first retry waits up to this many seconds (full jitter)
    backoff_max: float = BACKOFF_MAX
    title: str = "annotate"
    adaptive: bool = True        # cut the requests in flight on timeouts and overload answers


# Timeouts or overload answers in one run before the runner says so (once).
WARN_AFTER = 2


def _work(item: Item, backend: Backend, sh: InFlight, s: RunnerSettings,
          build_messages: Callable[[Item], list[Message]], parse: Callable[[Item, Completion], Any],
          options: Callable[[Item], dict[str, Any]] | None = None) -> tuple[str, Any, Usage, str | None]:
    """Try one item until it works or runs out of retries.

    Returns (kind, parsed, usage, error) with kind "ok", "failed" or "unsent" (stopped before
    anything usable came back; the item is left for a later run)."""
    usage = Usage(backend=backend.name, model=backend.model)
    last_error = "not attempted"
    for attempt in range(s.max_retries + 1):
        if sh.stop.is_set():
            return "unsent", None, usage, last_error
        messages = build_messages(item)
        reserved = sh.reserve(messages)
        if reserved is None:
            return "unsent", None, usage, "budget"
        epoch = sh.epoch
        usage.attempts += 1
        completion = None
        retry_after = None
        try:
            hints = options(item) if options else {}
            completion = backend.complete(messages, max_tokens=s.max_tokens, temperature=s.temperature,
                                          stop=sh.stop, **hints)
        except TransientError as e:
            last_error, retry_after = str(e), e.retry_after
            kind = getattr(e, "kind", "other")
            if kind in ("timeout", "overload"):
                # Cut the limit before this request gives its slot back, so the retry waits for it.
                sh.congested(epoch, kind, last_error, getattr(backend, "streaming", None), e.streamed)
        except RequestError as e:
            sh.settle(reserved, None)
            return "failed", None, usage, str(e)
        except Stopped:
            sh.settle(reserved, None)
            return "unsent", None, usage, last_error
        except FatalError as e:
            sh.settle(reserved, None)
            with sh.lock:
                sh.fatal = sh.fatal or e
            sh.stop.set()
            return "unsent", None, usage, str(e)
        cost = sh.settle(reserved, completion)
        if completion is not None:
            usage.add(completion, cost)
            sh.succeeded(completion)
            parsed, malformed = read_reply(item, completion, parse)
            if malformed is None:
                return "ok", parsed, usage, None
            last_error = malformed
        if attempt < s.max_retries and sh.stop.wait(backoff(attempt, retry_after, s.backoff_base, s.backoff_max)):
            return "unsent", None, usage, last_error
    return "failed", None, usage, f"{last_error} (after {usage.attempts} attempt{'s' if usage.attempts != 1 else ''})"


def pending(items: list[Item], output: Path, limit: int | None = None) -> tuple[list[Item], int]:
    """The items a run would send (not ok in `output` yet, at most `limit`), and how many are done:
    what --dry-run counts and a batch file holds. Reads `output` without touching it (no repair)."""
    state = resume_state(output, repair=False) if output.exists() else None
    todo = [it for it in items if not state or it.id not in state.ok]
    skipped = len(items) - len(todo)
    return (todo if limit is None else todo[:limit]), skipped


def run_items(items: Iterable[Item], backend: Backend, *, build_messages: Callable[[Item], list[Message]],
              parse: Callable[[Item, Completion], Any],
              make_record: Callable[[Item, Any, Usage, str | None], Record], output: Path,
              settings: RunnerSettings, price: Price = Price(),
              on_record: Callable[[Record], None] | None = None, resume: bool = True,
              request_options: Callable[[Item], dict[str, Any]] | None = None,
              spend: Spend | None = None) -> RunStats:
    """Run `items` through `backend` concurrently and append one record per finished item to `output`.

    With `resume=False` every item is sent, even one whose last record is ok (the caller decided
    what is still to do, e.g. eval answers again when the saved answer came from other settings).
    `spend`: the account to charge, whose budget limits the run (see the module's docstring).

    Returns the run's statistics. Raises FatalError (after writing what finished, and nothing at
    all before the first success) and KeyboardInterrupt (after writing what finished).
    """
    t0 = time.perf_counter()
    items = list(items)
    state = resume_state(output)
    stats = RunStats(total=len(items))
    todo = [it for it in items if not resume or it.id not in state.ok]
    stats.skipped = len(items) - len(todo)
    if settings.limit is not None:
        todo = todo[: settings.limit]
    stats.planned = len(todo)
    if not todo:
        stats.seconds = time.perf_counter() - t0
        return stats

    sh = InFlight(concurrency=settings.concurrency, max_tokens=settings.max_tokens, adaptive=settings.adaptive,
                  price=price, budget=spend.left if spend is not None else None,
                  first_token_limit=getattr(backend, "first_token_timeout", None))
    jobs: queue.Queue[Item | None] = queue.Queue()
    results: queue.Queue[tuple[Item, str, Any, Usage, str | None]] = queue.Queue()
    for it in todo:
        jobs.put(it)

    def worker() -> None:
        while True:
            try:
                it = jobs.get_nowait()
            except queue.Empty:
                return
            if sh.stop.is_set():
                results.put((it, "unsent", None, Usage(backend.name, backend.model), None))
                continue
            try:
                kind, parsed, usage, error = _work(it, backend, sh, settings, build_messages, parse, request_options)
            except BaseException as e:  # a bug in a callback: report it in the main thread
                results.put((it, "bug", e, Usage(backend.name, backend.model), None))
                sh.stop.set()
                return
            results.put((it, kind, parsed, usage, error))

    # Daemon threads: on Ctrl-C the process may exit while HTTP requests are still in flight.
    threads = [threading.Thread(target=worker, daemon=True, name=f"persllm-worker-{i}")
               for i in range(min(settings.concurrency, len(todo)))]
    for t in threads:
        t.start()

    appender: Appender | None = None
    held: list[Record] = []   # failed records waiting for the first success (see FatalError)
    seen_ok = False

    def write(record: Record) -> None:
        nonlocal appender
        if appender is None:
            appender = Appender(output)
        appender.append(record)
        if on_record:
            on_record(record)

    pending = len(todo)
    arriving = Arriving(backend)
    warned = False
    try:
        with console.progress("{task.fields[failed]} failed", "{task.fields[inflight]} in flight",
                              "{task.fields[tokens]} tok", "{task.fields[arriving]}", "${task.fields[cost]}") as bar:
            task = bar.add_task(settings.title, total=len(todo), failed=0, inflight=0, tokens=0, cost="0.00",
                                arriving="")
            while pending:
                if not warned and sh.timeouts + sh.overloads >= WARN_AFTER:
                    warned = True
                    with sh.lock:
                        trouble = (sh.timeouts, sh.overloads, int(sh.limit), sh.last_trouble)
                    console.warn(trouble_line(backend, *trouble))
                try:
                    it, kind, parsed, usage, error = results.get(timeout=0.2)
                except queue.Empty:
                    _refresh(bar, task, sh, stats, arriving)
                    continue
                pending -= 1
                if kind == "bug":
                    raise parsed
                stats.prompt_tokens += usage.prompt_tokens
                stats.completion_tokens += usage.completion_tokens
                stats.cost_usd += usage.cost_usd
                if kind == "unsent":
                    stats.not_sent += 1
                    continue
                record = make_record(it, parsed if kind == "ok" else None, usage, error)
                if kind == "ok":
                    stats.ok += 1
                    if not seen_ok:
                        seen_ok = True
                        for r in held:
                            write(r)
                        held.clear()
                    write(record)
                else:
                    stats.failed += 1
                    reason = failure_reason(error)
                    stats.errors[reason] = stats.errors.get(reason, 0) + 1
                    (write if seen_ok else held.append)(record)
                bar.advance(task)
                _refresh(bar, task, sh, stats, arriving)
            if sh.fatal is None:
                for r in held:
                    write(r)
    except KeyboardInterrupt:
        sh.stop.set()
        stats.stopped = "interrupted"
        if sh.fatal is None:   # items that failed before any success still end as failed records
            for r in held:
                write(r)
        raise
    finally:
        sh.stop.set()
        if backend.in_process:  # torch must not be running in a thread when the interpreter exits
            for t in threads:
                t.join()
        if appender is not None:
            appender.close()
        stats.requests = sh.requests
        stats.timeouts, stats.overloads, stats.concurrency = sh.timeouts, sh.overloads, sh.limit
        stats.ghosts, stats.ghost_seconds, stats.ghosts_real = sh.ghosts.added, sh.ghosts.seconds, sh.ghosts.real
        stats.seconds = time.perf_counter() - t0
    if sh.fatal is not None:
        stats.stopped = "fatal"
        raise sh.fatal
    if sh.budget_hit:
        stats.stopped = "budget"
    if spend is not None:
        spend.charge(stats.cost_usd, stats.prompt_tokens, stats.completion_tokens, requests=stats.requests)
        spend.budget_hit = spend.budget_hit or sh.budget_hit
    return stats


def _refresh(bar: Any, task: Any, sh: InFlight, stats: RunStats, arriving: Arriving) -> None:
    with sh.lock:
        tokens, cost, inflight = sh.prompt_tokens + sh.completion_tokens, sh.spent, sh.in_flight
    bar.update(task, failed=stats.failed, inflight=inflight, tokens=f"{tokens:,}", cost=f"{cost:.2f}",
               arriving=arriving.text(inflight))

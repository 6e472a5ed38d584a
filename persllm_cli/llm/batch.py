"""Batch files: the live path's requests written as OpenAI Batch API lines, and a results file
(the Batch API's output, or `vllm run-batch`'s) read back into the live path's records.

A command hands over a `Batch`: how an item becomes a request body (the body the live client
sends, `openai_compat.chat_body`), how a reply is parsed and how a record is made (the same
callbacks the runner gets). So a record imported from a batch is the record the live path would
have written for the same reply: the same parsing and validation, `failed` with the reason when a
reply is malformed or the request failed, the cost at the batch price.

    b = Batch("annotate", model, body=..., parse=..., make_record=..., output=path, price=batch_price)
    written = write_requests(Path("requests.jsonl"), b, pending_items)          # nothing sent
    stats = import_results([Path("results.jsonl")], b, items_by_id)             # append records

A request line: {"custom_id": item id, "method": "POST", "url": "/v1/chat/completions", "body": {...}}.
A result line (both engines): {"id", "custom_id", "response": {"status_code", "request_id", "body":
a chat completion, or {"error": ...} for a refused request}, "error": null, or why the request
failed without an HTTP answer (the Batch API: {"code", "message"}; vLLM: a string or an error object)}.

Importing is append-only and idempotent like the live path: the last record per id wins, an id
already `ok` is never written again, and a record equal to the id's last one is not appended again
(importing the same file twice writes nothing the second time). Lines of unknown or repeated ids
and lines that are not results are counted and reported, never written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from persllm_cli.core.errors import PersllmError
from persllm_cli.data.records import Record
from persllm_cli.data.store import Appender, open_atomic, resume_state
from persllm_cli.llm.pricing import Price
from persllm_cli.llm.progress import Estimate
from persllm_cli.llm.protocol import Completion, estimate_prompt_tokens, estimate_tokens
from persllm_cli.llm.runner import Item, Usage, failure_reason, read_reply

ENDPOINT = "/v1/chat/completions"
# The Batch API's limits on one input file (its documentation; vllm run-batch has none).
MAX_REQUESTS = 50_000
MAX_BYTES = 200 * 1024 * 1024
SHOWN_BAD_LINES = 5   # bad lines named one by one; the rest only counted


@dataclass(frozen=True)
class Batch:
    """A command's requests as a batch: the live path's callbacks, and the price of a batch request."""

    title: str
    model: str
    body: Callable[[Item], dict[str, Any]]
    parse: Callable[[Item, Completion], Any]
    make_record: Callable[[Item, Any, Usage, str | None], Record]
    output: Path
    price: Price
    max_tokens: int
    backend: str = "openai"   # the provider the records name (the format of the requests)


@dataclass
class Written:
    """What `write_requests` put in the file, and what it left out (a budget, the API's limits)."""

    estimate: Estimate
    bytes: int = 0
    over_budget: int = 0
    over_limits: int = 0


def request_line(custom_id: str, body: dict[str, Any]) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": ENDPOINT, "body": body},
                      ensure_ascii=False, separators=(",", ":")) + "\n"


def write_requests(path: Path, batch: Batch, items: Iterable[Item], *, budget_usd: float | None = None,
                   api_limits: bool = False) -> Written:
    """Write one request line per item, in order, atomically (streamed: the file is never held
    whole in memory). With `budget_usd`, items stop where their worst case (estimated prompt and
    `max_tokens` of reply, at the batch price) would pass it, as the live runner stops before a
    request could pass it; with `api_limits`, where the Batch API's limits per file would be passed."""
    est = Estimate(0, 0, batch.max_tokens, batch.price)
    out = Written(est)
    worst = 0.0
    with open_atomic(path) as f:
        for it in items:
            if out.over_budget or out.over_limits:
                if out.over_budget:
                    out.over_budget += 1
                else:
                    out.over_limits += 1
                continue
            body = batch.body(it)
            line = request_line(it.id, body)
            size = len(line.encode("utf-8"))
            prompt = estimate_prompt_tokens(body.get("messages") or [])
            cost = batch.price.cost(prompt, batch.max_tokens)
            if budget_usd is not None and worst + cost > budget_usd:
                out.over_budget = 1
                continue
            if api_limits and (est.requests + 1 > MAX_REQUESTS or out.bytes + size > MAX_BYTES):
                out.over_limits = 1
                continue
            f.write(line)
            worst += cost
            out.bytes += size
            est.requests += 1
            est.prompt_tokens += prompt
    return out


# ------------------------------------------------------------------------------------- results

class BadLine(ValueError):
    """A line of a results file that is not a result (counted and reported, never written)."""


def _message(error: Any) -> tuple[str | None, str]:
    """(code, message) of an error in any of the shapes the engines write."""
    if isinstance(error, str):
        return None, error
    if isinstance(error, dict):
        inner = error.get("error") if isinstance(error.get("error"), dict) else error
        code = inner.get("code")
        msg = inner.get("message")
        return (None if code is None else str(code)), " ".join(str(msg if msg is not None else inner).split())
    return None, str(error)


def status_error(status: int, message: str) -> str:
    """A refused request's reason, worded as the live client words the same HTTP answer."""
    if status == 429:
        return f"rate limited (429): {message}"
    if status >= 500:
        return f"server error ({status}): {message}"
    return f"request refused ({status}): {message}"


def read_result(obj: Any, model: str,
                estimate_prompt: Callable[[], int]) -> tuple[str, Completion | None, str | None]:
    """(custom_id, the reply, None) or (custom_id, None, why the request failed) of one result
    line; BadLine when it is not a result. `estimate_prompt()` counts the prompt of a reply that
    came without usage (as the live client does for a server that sends none)."""
    if not isinstance(obj, dict):
        raise BadLine(f"expected a JSON object, got {type(obj).__name__}")
    cid = obj.get("custom_id")
    if not isinstance(cid, str) or not cid:
        raise BadLine("no custom_id")
    if "response" not in obj and "error" not in obj:
        if "body" in obj and "url" in obj:
            raise BadLine("a request line (a batch input file), not a result")
        raise BadLine("neither a response nor an error")
    response, error = obj.get("response"), obj.get("error")
    if response is not None and not isinstance(response, dict):
        raise BadLine("response is not an object")
    status = (response or {}).get("status_code")
    body = (response or {}).get("body")
    if error:
        code, msg = _message(error)
        if isinstance(status, int) and status != 200:
            return cid, None, status_error(status, msg)
        return cid, None, f"batch error ({code}): {msg}" if code else f"batch error: {msg}"
    if response is None:
        raise BadLine("neither a response nor an error")
    if isinstance(status, int) and not 200 <= status < 300:
        _, msg = _message((body or {}).get("error") if isinstance(body, dict) else body)
        return cid, None, status_error(status, msg)
    if not isinstance(body, dict):
        raise BadLine("a response without a body")
    choices = body.get("choices")
    first = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    message = first.get("message") if isinstance(first.get("message"), dict) else {}
    text = message.get("content") if isinstance(message.get("content"), str) else ""
    usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
    pt, ct = usage.get("prompt_tokens"), usage.get("completion_tokens")
    name = body.get("model") if isinstance(body.get("model"), str) else model
    if isinstance(pt, int):
        return cid, Completion(text, pt, ct if isinstance(ct, int) else 0, 0.0, name, usage="server"), None
    return cid, Completion(text, estimate_prompt(), estimate_tokens(text), 0.0, name, usage="estimate"), None


@dataclass
class Imported:
    """What an import did with each line of the results."""

    lines: int = 0
    ok: int = 0
    failed: int = 0
    already_ok: int = 0      # the id's last record is ok: never a second ok record
    unchanged: int = 0       # the same record as the id's last one (this file imported before)
    unknown: int = 0         # not an id of this run's items
    duplicate: int = 0       # an id seen before in these results: the first one counts
    malformed: int = 0       # not JSON, not a result
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)
    bad_lines: list[str] = field(default_factory=list)   # the first few, as "file:line: why"

    @property
    def matched(self) -> int:
        """Lines that belong to one of the items (written or not)."""
        return self.ok + self.failed + self.already_ok + self.unchanged + self.duplicate

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["cost_usd"] = round(self.cost_usd, 6)
        return d

    def _bad(self, path: Path, line: int, why: str, kind: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        if len(self.bad_lines) < SHOWN_BAD_LINES:
            self.bad_lines.append(f"{path}:{line}: {why}")


def import_results(paths: list[Path], batch: Batch, items: dict[str, Item]) -> Imported:
    """Append one record per result line of an item in `items` to `batch.output` (see the
    module's docstring for what is left out). Files are read line by line, never whole."""
    for p in paths:
        if not Path(p).is_file():
            raise PersllmError(f"{p}: file not found" if not Path(p).exists() else f"{p}: is a directory, expected a file")
    state = resume_state(batch.output)   # repairs a torn last line first, as the live path does
    stats = Imported()
    seen: set[str] = set()
    appender: Appender | None = None
    try:
        for path in paths:
            with open(path, "rb") as f:
                for lineno, raw in enumerate(f, start=1):
                    if not raw.strip():
                        continue
                    stats.lines += 1
                    try:
                        obj = json.loads(raw.decode("utf-8"))
                    except UnicodeDecodeError:
                        stats._bad(path, lineno, "not UTF-8 text", "malformed")
                        continue
                    except json.JSONDecodeError as e:
                        stats._bad(path, lineno, f"not valid JSON ({e.msg})", "malformed")
                        continue
                    cid = obj.get("custom_id") if isinstance(obj, dict) else None
                    item = items.get(cid) if isinstance(cid, str) else None

                    def prompt(it: Item | None = item) -> int:
                        return estimate_prompt_tokens(batch.body(it)["messages"]) if it else 0
                    try:
                        cid, completion, error = read_result(obj, batch.model, prompt)
                    except BadLine as e:
                        stats._bad(path, lineno, str(e), "malformed")
                        continue
                    if item is None:
                        stats._bad(path, lineno, f"custom_id {cid[:16]}... is not one of this run's items", "unknown")
                        continue
                    if cid in seen:
                        stats._bad(path, lineno, f"custom_id {cid[:16]}... came before in these results", "duplicate")
                        continue
                    seen.add(cid)
                    if cid in state.ok:
                        stats.already_ok += 1
                        continue
                    usage = Usage(backend=batch.backend, model=batch.model, attempts=1)
                    if completion is not None:
                        usage.add(completion, batch.price.cost(completion.prompt_tokens, completion.completion_tokens))
                        parsed, error = read_reply(item, completion, batch.parse)
                    else:
                        parsed = None
                    record = batch.make_record(item, parsed, usage, error)
                    if state.records.get(cid) == record:
                        stats.unchanged += 1
                        continue
                    if appender is None:
                        appender = Appender(batch.output)
                    appender.append(record)
                    stats.prompt_tokens += usage.prompt_tokens
                    stats.completion_tokens += usage.completion_tokens
                    stats.cost_usd += usage.cost_usd
                    if error is None:
                        stats.ok += 1
                    else:
                        stats.failed += 1
                        reason = failure_reason(error)
                        stats.errors[reason] = stats.errors.get(reason, 0) + 1
    finally:
        if appender is not None:
            appender.close()
    return stats


def show_imported(st: Imported, what: str) -> None:
    """The table of an import on stderr, the failures by reason and the first bad lines."""
    from persllm_cli.core import console

    rows: list[list[object]] = [
        ["result lines", st.lines], ["records ok", st.ok], ["records failed", st.failed],
        ["already ok (not written again)", st.already_ok], ["imported before (not written again)", st.unchanged],
        ["unknown custom_id (skipped)", st.unknown], ["repeated custom_id (skipped)", st.duplicate],
        ["not a result line (skipped)", st.malformed], ["prompt tokens", f"{st.prompt_tokens:,}"],
        ["completion tokens", f"{st.completion_tokens:,}"], ["cost (batch price)", f"${st.cost_usd:.4f}"]]
    console.table(f"batch results: {what}", ["", "value"], rows)
    for reason, n in sorted(st.errors.items(), key=lambda kv: -kv[1]):
        console.note(f"  {n} failed: {reason}")
    skipped = st.unknown + st.duplicate + st.malformed
    for bad in st.bad_lines:
        console.warn(bad)
    if skipped > len(st.bad_lines):
        console.note(f"  ... {skipped - len(st.bad_lines)} more line(s) skipped")


def check_imported(st: Imported, paths: list[Path]) -> None:
    """An import that matched nothing is a mistake worth one line and exit 1 (nothing was written)."""
    names = ", ".join(str(p) for p in paths)
    if st.lines == 0:
        raise PersllmError(f"{names}: no result lines (the file is empty)")
    if st.matched == 0:
        raise PersllmError(f"none of the {st.lines} line(s) of {names} is a result for this run's items "
                           f"({st.unknown} of other ids, {st.malformed} not results): were the requests written "
                           "with other --stage, --pattern, --questions-per-paragraph or --instructions, or for "
                           "another project? Nothing was written")

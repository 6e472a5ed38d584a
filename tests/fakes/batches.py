"""The fake server's Batch API: `/v1/files` and `/v1/batches`, as the real one behaves (for tests).

Files: POST /files (multipart: `file`, `purpose`), GET /files/{id}, GET /files/{id}/content.
Batches: POST /batches (`input_file_id`, `endpoint`, `completion_window`), GET /batches/{id},
GET /batches, POST /batches/{id}/cancel.

A new batch is `validating` for `validate_seconds`, then `failed` (with `errors.data`: code, message,
line) when its file breaks a rule of the Batch API, else `in_progress` for `run_seconds` (its
`request_counts` growing), then `completed` with an output file (the answered lines) and an error
file (the refused ones). The rules checked, as the API documents them: every line a JSON object
with a non-empty `custom_id` unique in the file, `method` POST, `url` the batch's endpoint, a
`body` with a `model`, one model for the whole file, at most `max_requests` lines and `max_bytes`
bytes; the file's purpose `batch`; the endpoint `/v1/chat/completions`; the window `24h`.

Each line is answered as a chat completion request would be (the fake's responder and its script:
`Fail(status)` makes that line an error-file line with the status and an error body, `Malformed` /
`Reply` set the reply's text, `Expired()` an error line of a request the window ran out on).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import default as default_policy
from typing import Any, Callable

ENDPOINTS = ("/v1/chat/completions",)


@dataclass
class Expired:
    """Make the next batch line one the completion window ran out on (no HTTP answer)."""


@dataclass
class StoredFile:
    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: int

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "object": "file", "bytes": len(self.data), "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed"}


@dataclass
class FakeBatch:
    id: str
    input_file_id: str
    endpoint: str
    metadata: dict[str, Any] | None
    created: float
    lines: list[dict[str, Any]] = field(default_factory=list)   # the valid input lines
    errors: list[dict[str, Any]] = field(default_factory=list)  # validation errors
    cancelled_at: float | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    counts: tuple[int, int] = (0, 0)    # completed, failed (once answered)


def validate(data: bytes, endpoint: str, max_requests: int, max_bytes: int) -> tuple[list[dict], list[dict]]:
    """(lines, errors) of an input file, as the Batch API judges one."""
    errors: list[dict[str, Any]] = []

    def bad(code: str, message: str, line: int | None = None, param: str | None = None) -> None:
        errors.append({"code": code, "message": message, "param": param, "line": line})

    if len(data) > max_bytes:
        bad("file_too_large", f"The input file is {len(data)} bytes; a batch takes at most {max_bytes}.")
    lines: list[dict[str, Any]] = []
    seen: set[str] = set()
    models: set[str] = set()
    for n, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            bad("invalid_json_line", "This line is not parseable as valid JSON.", n)
            continue
        if not isinstance(obj, dict):
            bad("invalid_json_line", "Each line must be a JSON object.", n)
            continue
        cid = obj.get("custom_id")
        if not isinstance(cid, str) or not cid:
            bad("missing_required_parameter", "Missing required parameter: 'custom_id'.", n, "custom_id")
        elif cid in seen:
            bad("duplicate_custom_id", "The custom_id for this request is a duplicate of another request. "
                "The custom_id parameter must be unique for each request in a batch.", n, "custom_id")
        else:
            seen.add(cid)
        if obj.get("method") != "POST":
            bad("invalid_method", "The method must be POST.", n, "method")
        if obj.get("url") != endpoint:
            bad("invalid_url", f"The url {obj.get('url')!r} does not match the batch's endpoint {endpoint}.", n, "url")
        body = obj.get("body")
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            bad("missing_required_parameter", "Missing required parameter: 'body.model'.", n, "body.model")
        else:
            models.add(body["model"])
            if len(models) > 1:
                bad("mismatched_model", "The model in this request does not match the model of the other "
                    "requests in the file; a batch uses one model.", n, "body.model")
                models.discard(body["model"])
            if body.get("stream"):
                bad("invalid_request", "Streaming is not supported in a batch.", n, "body.stream")
        lines.append(obj)
    if len(lines) > max_requests:
        bad("too_many_requests", f"The input file has {len(lines)} requests; a batch takes at most {max_requests}.")
    if not lines and not errors:
        bad("empty_file", "The input file has no requests.")
    return lines, errors


def multipart(content_type: str, raw: bytes) -> dict[str, tuple[str | None, bytes]]:
    """name -> (filename, bytes) of a multipart/form-data body."""
    msg = BytesParser(policy=default_policy).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\nMIME-Version: 1.0\r\n\r\n" + raw)
    out: dict[str, tuple[str | None, bytes]] = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        out[str(name)] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return out


class BatchStore:
    """Files and batches of one fake server. `answer(body, n, action) -> (status, payload)` answers
    one line (the server's chat completion logic); `next_action()` pops the fake's script."""

    def __init__(self, answer: Callable[[dict, Any], tuple[int, dict]], next_action: Callable[[], Any],
                 validate_seconds: float, run_seconds: float, max_requests: int, max_bytes: int):
        self.answer, self.next_action = answer, next_action
        self.validate_seconds, self.run_seconds = validate_seconds, run_seconds
        self.max_requests, self.max_bytes = max_requests, max_bytes
        self.files: dict[str, StoredFile] = {}
        self.batches: dict[str, FakeBatch] = {}
        self.answered: list[dict[str, Any]] = []   # bodies of the batch lines answered, in order
        self.lock = threading.Lock()
        self._n = 0

    def _id(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}-fake{self._n:06d}"

    # -- files
    def upload(self, content_type: str, raw: bytes) -> tuple[int, dict]:
        if not content_type.startswith("multipart/form-data"):
            return 400, _error("Expected multipart/form-data.", "invalid_request")
        parts = multipart(content_type, raw)
        if "file" not in parts or "purpose" not in parts:
            return 400, _error("Missing required parameter: 'file' and 'purpose'.", "missing_required_parameter")
        purpose = parts["purpose"][1].decode()
        if purpose not in ("batch", "fine-tune", "assistants", "user_data"):
            return 400, _error(f"Invalid purpose {purpose!r}.", "invalid_request")
        with self.lock:
            f = StoredFile(self._id("file"), parts["file"][0] or "upload.jsonl", purpose, parts["file"][1],
                           int(time.time()))
            self.files[f.id] = f
        return 200, f.public()

    def file(self, file_id: str, content: bool) -> tuple[int, Any]:
        with self.lock:
            f = self.files.get(file_id)
        if f is None:
            return 404, _error(f"No such File object: {file_id}", "not_found")
        return 200, (f.data if content else f.public())

    # -- batches
    def create(self, body: dict[str, Any]) -> tuple[int, dict]:
        endpoint = body.get("endpoint")
        if endpoint not in ENDPOINTS:
            return 400, _error(f"Invalid endpoint {endpoint!r}.", "invalid_request", "endpoint")
        if body.get("completion_window") != "24h":
            return 400, _error("completion_window must be '24h'.", "invalid_request", "completion_window")
        with self.lock:
            f = self.files.get(str(body.get("input_file_id")))
            if f is None:
                return 404, _error(f"No such File object: {body.get('input_file_id')}", "not_found")
            if f.purpose != "batch":
                return 400, _error("The input file must be uploaded with purpose 'batch'.", "invalid_request")
            lines, errors = validate(f.data, endpoint, self.max_requests, self.max_bytes)
            b = FakeBatch(self._id("batch"), f.id, endpoint, body.get("metadata"), time.time(), lines, errors)
            self.batches[b.id] = b
        return 200, self.public(b)

    def get(self, batch_id: str) -> tuple[int, dict]:
        with self.lock:
            b = self.batches.get(batch_id)
            if b is None:
                return 404, _error(f"No such Batch object: {batch_id}", "not_found")
            return 200, self.public(b)

    def list(self) -> tuple[int, dict]:
        with self.lock:
            data = [self.public(b) for b in self.batches.values()]
        return 200, {"object": "list", "data": data[::-1], "has_more": False}

    def cancel(self, batch_id: str) -> tuple[int, dict]:
        with self.lock:
            b = self.batches.get(batch_id)
            if b is None:
                return 404, _error(f"No such Batch object: {batch_id}", "not_found")
            if b.cancelled_at is None and self._status(b) in ("validating", "in_progress"):
                b.cancelled_at = time.time()
                self._finish(b, cancelled=True)
            return 200, self.public(b)

    def _status(self, b: FakeBatch) -> str:
        if b.cancelled_at is not None:
            return "cancelled"
        age = time.time() - b.created
        if age < self.validate_seconds:
            return "validating"
        if b.errors:
            return "failed"
        if age < self.validate_seconds + self.run_seconds:
            return "in_progress"
        return "completed"

    def _finish(self, b: FakeBatch, cancelled: bool = False) -> None:
        """Answer the lines (all, or for a cancelled batch those its time allowed) into the files."""
        if b.output_file_id is not None:
            return
        share = 1.0 if not cancelled else min(1.0, max(0.0, (time.time() - b.created - self.validate_seconds)
                                                        / max(self.run_seconds, 1e-9)))
        n = int(len(b.lines) * share)
        out, err = [], []
        for i, line in enumerate(b.lines[:n]):
            action = self.next_action()
            self.answered.append(line["body"])
            rid = f"batch_req_{b.id}_{i}"
            if isinstance(action, Expired):
                err.append({"id": rid, "custom_id": line["custom_id"], "response": None, "error": {
                    "code": "batch_expired",
                    "message": "This request could not be executed before the completion window expired."}})
                continue
            status, payload = self.answer(line["body"], action)
            entry = {"id": rid, "custom_id": line["custom_id"],
                     "response": {"status_code": status, "request_id": f"req_{i}", "body": payload}, "error": None}
            (out if status == 200 else err).append(entry)
        for kind, rows in (("output", out), ("error", err)):
            if rows:
                f = StoredFile(self._id("file"), f"batch_{b.id}_{kind}.jsonl", "batch_output",
                               "".join(json.dumps(r) + "\n" for r in rows).encode(), int(time.time()))
                self.files[f.id] = f
                setattr(b, f"{kind}_file_id", f.id)
        b.counts = (len(out), len(err))
        if not out and not err:
            b.output_file_id = ""   # answered: nothing more to do

    def public(self, b: FakeBatch) -> dict[str, Any]:
        status = self._status(b)
        if status == "completed":
            self._finish(b)
        total = len(b.lines) if status != "failed" else 0
        if status == "in_progress":
            share = (time.time() - b.created - self.validate_seconds) / max(self.run_seconds, 1e-9)
            done, failed = int(total * min(1.0, share)), 0
        elif status in ("completed", "cancelled"):
            done, failed = b.counts
        else:
            done, failed = 0, 0
        t = int(b.created)
        return {
            "id": b.id, "object": "batch", "endpoint": b.endpoint, "input_file_id": b.input_file_id,
            "completion_window": "24h", "status": status, "created_at": t, "expires_at": t + 86400,
            "errors": {"object": "list", "data": b.errors} if status == "failed" else None,
            "output_file_id": b.output_file_id or None, "error_file_id": b.error_file_id,
            "in_progress_at": t if status not in ("validating", "failed") else None,
            "failed_at": t if status == "failed" else None,
            "completed_at": int(time.time()) if status == "completed" else None,
            "cancelled_at": int(b.cancelled_at) if b.cancelled_at else None,
            "finalizing_at": None, "expired_at": None, "cancelling_at": None,
            "request_counts": {"total": total, "completed": done, "failed": failed},
            "metadata": b.metadata,
        }


def _error(message: str, code: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}

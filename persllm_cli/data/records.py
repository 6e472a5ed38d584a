"""The record schema: what one line of a record file is (schema in CLI.md), the chat message every
model and API exchange carries, the method's question patterns, and the record's parts every
command reads (its id, question, answer, and whether it can be trained on). Reading and writing the
files is store.py.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterable

Record = dict[str, Any]


# One chat message, as records, prompts and every model and API exchange carry them.
Message = dict[str, str]

# The question patterns of the method: plain questions, false premises to reject, opinions.
PATTERNS = ("ordinary", "error", "thought")


def record_id(persona: str, stage: str, pattern: str, source_file: str, line: int, k: int) -> str:
    """Stable id: sha256 of persona|stage|pattern|source file|line|k (k numbers questions per paragraph)."""
    key = "|".join([persona, stage, pattern, source_file, str(line), str(k)])
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def question(record: Record) -> str | None:
    """The first user message's text, or None."""
    for m in record.get("messages") or []:
        if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str):
            return m["content"]
    return None


def answer(record: Record) -> str | None:
    """The last assistant message's text, or None."""
    for m in reversed(record.get("messages") or []):
        if isinstance(m, dict) and m.get("role") == "assistant" and isinstance(m.get("content"), str):
            return m["content"]
    return None


def unusable_reason(record: Record) -> str | None:
    """Why a record cannot be used as training data (None when it can): 'failed', 'no question', ..."""
    if record.get("status") != "ok":
        return "failed"
    q, a = question(record), answer(record)
    if not q or not q.strip():
        return "no question"
    if not a or not a.strip():
        return "no answer"
    return None


def latest_by_id(records: Iterable[Record]) -> dict[str, Record]:
    """The last record per id, in order of first appearance (append-only files: last one wins)."""
    out: dict[str, Record] = {}
    for r in records:
        rid = r.get("id")
        if isinstance(rid, str):
            out[rid] = r
    return out

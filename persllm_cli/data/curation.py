"""What dedup, split and dpo share: reading record files with line numbers, checking records,
and the (stage, pattern) summary table."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

from persllm_cli.data import records

from persllm_cli.data import store
from persllm_cli.core.errors import PersllmError
from persllm_cli.data.records import Record


def read_numbered(path: Path, *, what: str = "records") -> list[tuple[int, Record]]:
    """(line number, record) for every record of a file that must exist and hold at least one.

    Malformed lines fail in store.read_jsonl with file:line; the numbers let later checks name the
    line of a record that parses but lacks a field.
    """
    recs = store.read_records(path, what=what)
    text = Path(path).read_bytes().decode("utf-8")
    numbers = [i for i, line in enumerate(text.split("\n"), start=1) if line.strip()]
    return list(zip(numbers, recs))


def latest(numbered: list[tuple[int, Record]]) -> tuple[list[tuple[int, Record]], int, int]:
    """The last record per id, in order of first appearance (append-only files: the last one wins).

    Returns (records, how many earlier versions were superseded, how many records had no id).
    Records without an id cannot be told apart from others, so they are left out and counted.
    """
    by_id: dict[str, tuple[int, Record]] = {}
    no_id = 0
    for line, r in numbered:
        rid = r.get("id")
        if isinstance(rid, str) and rid:
            by_id[rid] = (line, r)
        else:
            no_id += 1
    superseded = len(numbered) - no_id - len(by_id)
    return list(by_id.values()), superseded, no_id


def check_stages(path: Path, numbered: list[tuple[int, Record]], project) -> None:
    """One clear error naming the first record whose stage persllm.toml does not list: such a
    record would get no time token, and is most likely a typo or another project's file."""
    known = {s.id for s in project.stages}
    for line, r in numbered:
        stage = r.get("stage")
        if isinstance(stage, str) and stage and stage not in known:
            raise PersllmError(f"{path}:{line}: record has stage {stage!r}, which {project.root / 'persllm.toml'} "
                               f"does not list (stages: {', '.join(s.id for s in project.stages)})")


def check_usable(path: Path, numbered: list[tuple[int, Record]], hint: str, project) -> list[Record]:
    """Records ready for training data, or one clear error naming the first bad line."""
    check_stages(path, numbered, project)
    out = []
    for line, r in numbered:
        problem = None
        if not isinstance(r.get("id"), str) or not r["id"]:
            problem = "has no id"
        elif not isinstance(r.get("stage"), str) or not r["stage"]:
            problem = "has no stage"
        else:
            reason = records.unusable_reason(r)
            if reason == "failed":
                problem = f"is a failed record (status {r.get('status')!r})"
            elif reason:
                problem = f"has {reason}"
        if problem:
            raise PersllmError(f"{path}:{line}: record {problem}; {hint}")
        out.append(r)
    return out


def pattern(r: Record) -> str:
    p = r.get("pattern")
    return p if isinstance(p, str) and p else "-"


def persona(r: Record, default: str) -> str:
    p = r.get("persona")
    return p if isinstance(p, str) and p else default


_PUNCT_SPACE = re.compile(r"\s+")


def normalise(text: str) -> str:
    """Text for "is this the same answer?": NFKC, case-folded, punctuation dropped, spaces squeezed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text)
    return _PUNCT_SPACE.sub(" ", text).strip()


def stage_order(project, stage_ids: set[str]) -> list[str]:
    """Stage ids in the project's chronological order, unknown ones after, alphabetically."""
    known = [s.id for s in project.stages if s.id in stage_ids] if project else []
    return known + sorted(stage_ids - set(known))

"""The judge's protocols, one entry each in `PROTOCOLS`: which answered items it asks about, its
requests per item, the judge's prompt and the verdicts it accepts, how the verdicts add up in a
system's summary, and its rows in the report. A new protocol is one more entry (and its prompt in
templates/eval/).

A request's kind (`ab`, `premise`, ...) is part of the key its verdict is stored under
(`task_key`), so a rerun finds it again: a kind is never renamed.

- compare: the answer against the reference twice, as A/B (`ab`) and as B/A (`ba`); a win only
  when both orders prefer the answer, a loss only when both prefer the reference, else a tie. This
  cancels the judge's position bias instead of hiding it (`consistency`: both orders agree).
- premise: a question with a false premise (`error` pattern): did the answer reject it?
- knowledge: an item the judge classed as knowledge: a 0-5 score of how much of the reference's
  knowledge the answer carries.
- attitude: an item the judge classed as attitude: every system's answer ranked together in one
  request (judge.rank); it has no per-answer request.
- leak: a later stage's question asked at an earlier stage: does the answer reveal what the
  character only learns later? A trained run's answer with no stage token (`no_token`) is judged
  against the same stage, so the two leak rates show what the time tokens do.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from statistics import fmean
from typing import Any, Callable

from persllm_cli.data.records import Record

LEAK = "leak"                      # the pattern of a leak item (a later question asked earlier)


@dataclass
class Answered:
    """One answered test item, as the judge needs it. For a leak item (pattern `leak`) the
    question and reference come from `later_label`'s material; the answer was given at
    `stage_label`."""

    test_id: str
    persona: str
    stage_label: str
    pattern: str
    question: str
    reference: str
    answer: str
    category: str | None = None     # the judge's classification of the test item, when known
    later_label: str = ""
    stage: str = ""                 # the stage id the answer was given at (leak items: the earlier one)
    no_token: bool = False          # a leak item answered with no stage token, judged against `stage`


Judged = list[tuple[Answered, tuple[str, ...]]]   # the items a protocol judged, with one verdict per kind


@dataclass(frozen=True)
class Row:
    """One row of the report: its label, its key in a system's judge summary, and the chart panel
    it is drawn in ("share": 0-100 beside the reference overlap, "score": the judge's scores, None)."""

    label: str
    key: str
    chart: str | None = None


def _answer_values(item: Answered, kind: str) -> dict[str, str]:
    return {"reference": item.reference, "answer": item.answer}


@dataclass(frozen=True)
class Protocol:
    name: str
    kinds: tuple[str, ...]                                  # its requests per item (empty: asked another way)
    template: str                                           # the judge's prompt, in templates/
    rows: tuple[Row, ...]
    asks: Callable[[Answered], bool] = lambda item: False   # which answered items it judges
    choices: tuple[str, ...] = ()                           # the verdicts it accepts
    values: Callable[[Answered, str], dict[str, str]] = _answer_values  # the prompt's values besides
    #                                                         persona, stage_label and question
    score: Callable[[Judged], dict[str, Any]] | None = None  # its part of a system's judge summary


def _pct(hits: int, n: int) -> float | None:
    return 100 * hits / n if n else None


def _compare_values(item: Answered, kind: str) -> dict[str, str]:
    a, b = (item.answer, item.reference) if kind == "ab" else (item.reference, item.answer)
    return {"answer_a": a, "answer_b": b}


def _compare_score(judged: Judged) -> dict[str, Any]:
    """Per item: +1 for each order that prefers the answer, -1 for each that prefers the reference,
    halved. `preference` is their mean on 0-100: 100 = always preferred, 50 = on a par, 0 = never."""
    scores, agree = [], 0
    for _, (ab, ba) in judged:
        first = {"a": 1, "b": -1, "tie": 0}[ab]     # the system's answer was A
        second = {"b": 1, "a": -1, "tie": 0}[ba]    # the system's answer was B
        scores.append((first + second) / 2)
        agree += first == second
    n = len(scores)
    return {"items": n, "win": _pct(sum(s > 0 for s in scores), n), "tie": _pct(sum(s == 0 for s in scores), n),
            "loss": _pct(sum(s < 0 for s in scores), n),
            "preference": 100 * fmean((s + 1) / 2 for s in scores) if n else None, "consistency": _pct(agree, n)}


def _premise_score(judged: Judged) -> dict[str, Any]:
    rejected = [v == "yes" for _, (v,) in judged]
    return {"premise_items": len(rejected), "premise_rejected": _pct(sum(rejected), len(rejected))}


def _knowledge_score(judged: Judged) -> dict[str, Any]:
    scores = [int(v) for _, (v,) in judged]
    return {"knowledge_items": len(scores), "knowledge_score": fmean(scores) if scores else None}


def _leak_score(judged: Judged) -> dict[str, Any]:
    """The leak rate overall and per stage the answer was given at, with the stage token and
    (`leak_notoken_*`) without one."""
    leaks: dict[str, list[bool]] = {}
    bare: dict[str, list[bool]] = {}     # the same leak questions answered with no stage token
    for item, (v,) in judged:
        (bare if item.no_token else leaks).setdefault(item.stage, []).append(v == "yes")
    out: dict[str, Any] = {}
    for prefix, got in (("leak", leaks), ("leak_notoken", bare)):
        every = [x for v in got.values() for x in v]
        out[f"{prefix}_items"] = len(every)
        out[f"{prefix}_rate"] = _pct(sum(every), len(every))
        out[f"{prefix}_by_stage"] = {st: {"items": len(v), "leaked": sum(v), "rate": 100 * sum(v) / len(v)}
                                     for st, v in got.items()}
    return out


PROTOCOLS: tuple[Protocol, ...] = (
    Protocol("compare", ("ab", "ba"), "eval/judge_compare.txt",
             rows=(Row("judge preference %", "preference", "share"), Row("judge win %", "win"),
                   Row("judge tie %", "tie"), Row("judge loss %", "loss"),
                   Row("judge order consistency %", "consistency")),
             asks=lambda item: item.pattern != LEAK, choices=("a", "b", "tie"), values=_compare_values,
             score=_compare_score),
    Protocol("premise", ("premise",), "eval/judge_premise.txt",
             rows=(Row("false premise rejected %", "premise_rejected", "share"),),
             asks=lambda item: item.pattern == "error", choices=("yes", "no"), score=_premise_score),
    Protocol("knowledge", ("knowledge",), "eval/judge_knowledge.txt",
             rows=(Row("knowledge score (0-5)", "knowledge_score", "score"),),
             asks=lambda item: item.pattern != LEAK and item.category == "knowledge",
             choices=tuple(str(k) for k in range(6)), score=_knowledge_score),
    Protocol("attitude", (), "eval/judge_rank.txt",   # ranked across systems by judge.rank
             rows=(Row("attitude rank (1 = best)", "attitude_rank", "score"),)),
    Protocol(LEAK, (LEAK,), "eval/judge_leak.txt",
             rows=(Row("time leak % (lower is better)", "leak_rate", "share"),
                   Row("time leak % without a stage token", "leak_notoken_rate", "share")),
             asks=lambda item: item.pattern == LEAK, choices=("yes", "no"),
             values=lambda item, kind: {**_answer_values(item, kind), "later_label": item.later_label},
             score=_leak_score),
)
BY_NAME = {p.name: p for p in PROTOCOLS}
BY_KIND = {kind: p for p in PROTOCOLS for kind in p.kinds}


def verdict_key(*parts: str) -> str:
    """The key a verdict is stored under: a hash of what it was asked about."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode("utf-8") + b"\0")
    return h.hexdigest()


def task_key(item: Answered, kind: str, judge_model: str) -> str:
    """The key of one request's verdict: the test item, the kind, the judge and the answer judged."""
    return verdict_key(item.test_id, kind, judge_model, item.answer)


def asked(item: Answered) -> list[Protocol]:
    """The protocols that judge this item, in the table's order."""
    return [p for p in PROTOCOLS if p.kinds and p.asks(item)]


def summarize(items: list[Answered], verdicts: dict[str, Record], judge_model: str) -> dict[str, Any]:
    """A system's judge summary: every protocol's scores over the items that got all their verdicts,
    and `failed`, the (item, protocol) pairs missing one."""
    judged: dict[str, Judged] = {p.name: [] for p in PROTOCOLS}
    failed = 0
    for item in items:
        def verdict(kind: str) -> str | None:
            r = verdicts.get(task_key(item, kind, judge_model))
            return r.get("verdict") if r and r.get("status") == "ok" else None

        for p in asked(item):
            got = tuple(verdict(kind) for kind in p.kinds)
            if None in got:
                failed += 1
            else:
                judged[p.name].append((item, got))
    out: dict[str, Any] = {}
    for p in PROTOCOLS:
        if p.score is not None:
            out.update(p.score(judged[p.name]))
    out["failed"] = failed
    return out

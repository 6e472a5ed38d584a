"""The LLM judge of `persllm eval`: pairwise comparison with the reference, and false premises.

For every answered test item the judge sees the system's answer and the reference answer twice,
once as A/B and once as B/A; an item counts as a win only when the judge prefers the system's
answer in both orders, a loss only when it prefers the reference in both, else a tie. This cancels
the judge's position bias instead of hiding it (the share of items where both orders agree is
reported as `consistency`). For `error`-pattern items (a question with a false premise) the judge
also answers yes/no: did the answer reject the premise?

The judge is any `llm.Backend`. Verdicts are appended to a JSONL file, one record per request,
keyed by (test id, kind, judge model, answer text), so a rerun only asks what is missing and a
regenerated answer is judged again.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from statistics import fmean
from typing import Any, Iterable

from persllm_cli.core import resources
from persllm_cli.llm.backends import Backend, Completion
from persllm_cli.data.records import Record
from persllm_cli.llm.pricing import Price, Pricing
from persllm_cli.llm.runner import Budget, Item as Task, Malformed, RunnerSettings, Usage, run_items

KINDS = ("ab", "ba", "premise")   # ab: the system's answer is A; ba: it is B

# "Verdict" then up to 8 non-word characters (colons, spaces, markdown, brackets), then the word.
_VERDICT = re.compile(r"verdict[\W_]{0,8}?(a|b|tie|yes|no)\b", re.IGNORECASE)


def parse_verdict(text: str, choices: Iterable[str]) -> str | None:
    """The verdict in a judge's reply, lowercased, or None when it gave none of `choices`.

    Takes the last "Verdict: X" line (markdown emphasis, brackets and a full-width colon are
    tolerated); failing that, a reply that is nothing but one of the choices."""
    allowed = {c.lower() for c in choices}
    found = [m.group(1).lower() for m in _VERDICT.finditer(text or "")]
    found = [f for f in found if f in allowed]
    if found:
        return found[-1]
    bare = re.sub(r"[\s*_`\"'.!\[\]()]+", "", text or "").lower()
    return bare if bare in allowed else None


@dataclass
class Item:
    """One answered test item, as the judge needs it."""

    test_id: str
    persona: str
    stage_label: str
    pattern: str
    question: str
    reference: str
    answer: str


def task_key(item: Item, kind: str, judge_model: str) -> str:
    h = hashlib.sha256()
    for part in (item.test_id, kind, judge_model, item.answer):
        h.update(part.encode("utf-8") + b"\0")
    return h.hexdigest()


def prompt(item: Item, kind: str) -> list[dict[str, str]]:
    common = dict(persona=item.persona, stage_label=item.stage_label, question=item.question)
    if kind == "premise":
        text = resources.render("eval/judge_premise.txt", reference=item.reference, answer=item.answer, **common)
    else:
        a, b = (item.answer, item.reference) if kind == "ab" else (item.reference, item.answer)
        text = resources.render("eval/judge_compare.txt", answer_a=a, answer_b=b, **common)
    return [{"role": "user", "content": text}]


def tasks(items: list[Item], judge_model: str) -> list[tuple[str, str, Item]]:
    """(key, kind, item) for every request the judge has to answer, in a fixed order."""
    out = []
    for item in items:
        for kind in KINDS:
            if kind == "premise" and item.pattern != "error":
                continue
            out.append((task_key(item, kind, judge_model), kind, item))
    return out


@dataclass
class Spend:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float | None = 0.0


def choices(kind: str) -> tuple[str, ...]:
    return ("yes", "no") if kind == "premise" else ("a", "b", "tie")


def run(backend: Backend, items: list[Item], path, *, max_tokens: int = 512, pricing: Pricing | None = None,
        settings: RunnerSettings | None = None, budget: Budget | None = None) -> tuple[dict[str, Record], Spend]:
    """Judge every item not judged yet through the concurrent runner (retries, Retry-After,
    accounting; a reply without a verdict is retried like a transient error), appending one
    verdict per request to `path`. Returns the verdicts of these items (old and new, last record
    per key) and what this call spent. Fatal errors (bad key, unknown model) propagate."""
    from persllm_cli.data.records import resume_state

    pricing = pricing or Pricing(backend.model, Price(), False)
    rs = settings or RunnerSettings()
    rs = RunnerSettings(**{**rs.__dict__, "max_tokens": max_tokens, "temperature": 0.0})
    if budget is not None:
        rs = budget.settings(rs)
    todo = tasks(items, backend.model)

    def parse(task: Task, c: Completion) -> tuple[str, str]:
        verdict = parse_verdict(c.text, choices(task.data[0]))
        if verdict is None:
            raise Malformed("no verdict in the judge's reply")
        return verdict, c.text

    def make_record(task: Task, parsed: tuple[str, str] | None, usage: Usage, error: str | None) -> Record:
        kind, item = task.data
        verdict, reply = parsed if parsed else (None, None)
        usage_d = usage.as_dict()
        usage_d["cost_usd"] = usage.cost_usd if pricing.known else None   # unrounded: totals add these up
        return {"id": task.id, "test_id": item.test_id, "kind": kind, "verdict": verdict, "reply": reply,
                "judge": usage_d, "status": "ok" if parsed else "failed", "error": error}

    stats = run_items([Task(key, (kind, item)) for key, kind, item in todo], backend,
                      build_messages=lambda task: prompt(task.data[1], task.data[0]), parse=parse,
                      make_record=make_record, output=path, settings=rs, price=pricing.price)
    if budget is not None:
        budget.charge(stats)
    spend = Spend(requests=stats.requests, prompt_tokens=stats.prompt_tokens,
                  completion_tokens=stats.completion_tokens, cost_usd=stats.cost_usd if pricing.known else None)
    state = resume_state(path)
    wanted = {t[0] for t in todo}
    return {k: r for k, r in state.records.items() if k in wanted}, spend


def total_spend(verdicts: dict[str, Record]) -> Spend:
    """What the verdicts in use cost when they were asked (this run or earlier ones)."""
    total = Spend()
    for r in verdicts.values():
        j = r.get("judge") or {}
        total.requests += int(j.get("attempts") or 0)
        total.prompt_tokens += int(j.get("prompt_tokens") or 0)
        total.completion_tokens += int(j.get("completion_tokens") or 0)
        cost = j.get("cost_usd")
        total.cost_usd = None if cost is None or total.cost_usd is None else total.cost_usd + cost
    return total


def summarize(items: list[Item], verdicts: dict[str, Record], judge_model: str) -> dict[str, Any]:
    """Win/tie/loss against the reference (both orders must agree), consistency, premise rejection.

    `preference` is the mean of per-item scores on 0-100 where one order's vote is worth half:
    100 = always preferred to the reference, 50 = on a par, 0 = never."""
    scores, agree, premise, failed = [], 0, [], 0
    for item in items:
        def verdict(kind: str) -> str | None:
            r = verdicts.get(task_key(item, kind, judge_model))
            return r.get("verdict") if r and r.get("status") == "ok" else None

        ab, ba = verdict("ab"), verdict("ba")
        if ab is None or ba is None:
            failed += 1
        else:
            first = {"a": 1, "b": -1, "tie": 0}[ab]     # the system's answer was A
            second = {"b": 1, "a": -1, "tie": 0}[ba]    # the system's answer was B
            scores.append((first + second) / 2)
            agree += first == second
        if item.pattern == "error":
            p = verdict("premise")
            if p is None:
                failed += 1
            else:
                premise.append(p == "yes")
    n = len(scores)
    return {
        "items": n,
        "win": 100 * sum(s > 0 for s in scores) / n if n else None,
        "tie": 100 * sum(s == 0 for s in scores) / n if n else None,
        "loss": 100 * sum(s < 0 for s in scores) / n if n else None,
        "preference": 100 * fmean((s + 1) / 2 for s in scores) if n else None,
        "consistency": 100 * agree / n if n else None,
        "premise_items": len(premise),
        "premise_rejected": 100 * sum(premise) / len(premise) if premise else None,
        "failed": failed,
    }

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
import time
from dataclasses import dataclass
from statistics import fmean
from typing import Any, Callable, Iterable

from persllm_cli import resources
from persllm_cli.llm import Backend, Completion, TransientError
from persllm_cli.records import Appender, Record, resume_state

KINDS = ("ab", "ba", "premise")   # ab: the system's answer is A; ba: it is B

# Dollars per million tokens (prompt, completion). Unknown models are counted in tokens only.
# TODO(merge): share one table with annotate's [annotate] prices.
PRICES: dict[str, tuple[float, float]] = {
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4-turbo": (10.00, 30.00),
}

# "Verdict" then up to 8 non-word characters (colons, spaces, markdown, brackets), then the word.
_VERDICT = re.compile(r"verdict[\W_]{0,8}?(a|b|tie|yes|no)\b", re.IGNORECASE)


def cost_usd(model: str, prompt_tokens: int, completion_tokens: int,
             prices: dict[str, tuple[float, float]] | None = None) -> float | None:
    price = (prices or PRICES).get(model)
    if price is None:
        return None
    return (prompt_tokens * price[0] + completion_tokens * price[1]) / 1e6


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

    def add(self, c: Completion, cost: float | None) -> None:
        self.requests += 1
        self.prompt_tokens += c.prompt_tokens
        self.completion_tokens += c.completion_tokens
        self.cost_usd = None if cost is None or self.cost_usd is None else self.cost_usd + cost


def ask(backend: Backend, key: str, kind: str, item: Item, *, max_tokens: int, attempts: int = 2,
        prices: dict[str, tuple[float, float]] | None = None, spend: Spend | None = None) -> Record:
    """Ask the judge one question; a reply without a verdict or a transient error is retried,
    then recorded as failed. Fatal errors (bad key, unknown model) propagate."""
    choices = ("yes", "no") if kind == "premise" else ("a", "b", "tie")
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0, "seconds": 0.0}
    error, reply, verdict = None, None, None
    for attempt in range(1, attempts + 1):
        try:
            c = backend.complete(prompt(item, kind), max_tokens=max_tokens, temperature=0.0)
        except TransientError as e:
            error = f"transient: {e}"
            if attempt < attempts:
                time.sleep(min(e.retry_after if e.retry_after is not None else 0.5, 30.0))
            continue
        cost = cost_usd(backend.model, c.prompt_tokens, c.completion_tokens, prices)
        if spend is not None:
            spend.add(c, cost)
        usage["prompt_tokens"] += c.prompt_tokens
        usage["completion_tokens"] += c.completion_tokens
        usage["seconds"] += c.seconds
        usage["cost_usd"] = None if cost is None or usage["cost_usd"] is None else usage["cost_usd"] + cost
        reply = c.text
        verdict = parse_verdict(c.text, choices)
        if verdict is not None:
            error = None
            break
        error = "no verdict in the judge's reply"
    return {
        "id": key, "test_id": item.test_id, "kind": kind, "verdict": verdict, "reply": reply,
        "judge": {"backend": getattr(backend, "name", "?"), "model": backend.model, "attempts": attempt, **usage},
        "status": "ok" if verdict is not None else "failed", "error": error,
    }


def run(backend: Backend, items: list[Item], path, *, max_tokens: int = 512,
        prices: dict[str, tuple[float, float]] | None = None,
        on_done: Callable[[Record], None] | None = None) -> tuple[dict[str, Record], Spend]:
    """Judge every item not judged yet; append verdicts to `path`. Returns the verdicts of these
    items (old and new, last record per key) and what this call spent.

    TODO(merge): hand the pending tasks to runner.py for concurrency, backoff and budgets; this
    loop asks one question at a time."""
    todo = tasks(items, backend.model)
    state = resume_state(path)
    spend = Spend()
    pending = [t for t in todo if t[0] not in state.ok]
    if pending:
        backend.check()
        with Appender(path) as out:
            for key, kind, item in pending:
                rec = ask(backend, key, kind, item, max_tokens=max_tokens, prices=prices, spend=spend)
                out.append(rec)
                state.records[key] = rec
                if on_done:
                    on_done(rec)
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

"""The LLM judge of `persllm eval`: asks the judge model what the protocols (eval/protocols.py:
compare with the reference in both orders, false premises, knowledge score, attitude ranking, time
leakage) need to know, through the concurrent runner.

The judge is any `llm.Backend`. Verdicts are appended to a JSONL file, one record per request,
keyed by (test id, kind, judge model, answer text), so a rerun only asks what is missing and a
regenerated answer is judged again.

Two requests are not per answer:
- every test item is first classified once as knowledge, attitude or neither (`classify`: `class`
  records, keyed by test id, judge model, question and reference); the class decides which
  protocols judge its answers;
- an attitude item's answers of all systems are ranked together in one request (`rank`), shown
  in an order shuffled per item with a seeded generator; the record keeps that order so the
  letters are mapped back to systems (ties allowed: a system's rank is 1 + the systems ahead).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

from persllm_cli.core import resources
from persllm_cli.llm.protocol import Backend, Completion
from persllm_cli.data.records import Record
from persllm_cli.llm.pricing import Price, Pricing, Spend
from persllm_cli.llm.runner import Item as Task, Malformed, RunnerSettings, Usage, run_items
from persllm_cli.eval.protocols import BY_KIND, BY_NAME, Answered, asked, task_key, verdict_key

CATEGORIES = ("knowledge", "attitude", "neither")

# "Verdict" then up to 8 non-word characters (colons, spaces, markdown, brackets), then the word.
_VERDICT = re.compile(r"verdict[\W_]{0,8}?([a-z0-9]+)\b", re.IGNORECASE)


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


def prompt(item: Answered, kind: str) -> list[dict[str, str]]:
    """The judge's request of one kind about one answered item, from its protocol's template."""
    text = resources.render(BY_KIND[kind].template, persona=item.persona, stage_label=item.stage_label,
                            question=item.question, **BY_KIND[kind].values(item, kind))
    return [{"role": "user", "content": text}]


def tasks(items: list[Answered], judge_model: str) -> list[tuple[str, str, Answered]]:
    """(key, kind, item) for every request the judge has to answer, in a fixed order."""
    return [(task_key(item, kind, judge_model), kind, item) for item in items for p in asked(item) for kind in p.kinds]




def run(backend: Backend, items: list[Answered], path, *, max_tokens: int = 512, pricing: Pricing | None = None,
        settings: RunnerSettings | None = None, budget: Spend | None = None) -> tuple[dict[str, Record], Spend]:
    """Judge every item not judged yet through the concurrent runner (retries, Retry-After,
    accounting; a reply without a verdict is retried like a transient error), appending one
    verdict per request to `path`. Returns the verdicts of these items (old and new, last record
    per key) and what this call spent. Fatal errors (bad key, unknown model) propagate."""
    todo = [(key, kind, item) for key, kind, item in tasks(items, backend.model)]
    return ask(backend, todo, path, build_messages=lambda kind, item: prompt(item, kind),
               parse=lambda kind, item, text: parse_verdict(text, BY_KIND[kind].choices),
               fields=lambda kind, item: {"test_id": item.test_id, "kind": kind},
               max_tokens=max_tokens, pricing=pricing, settings=settings, budget=budget)


def ask(backend: Backend, todo: list[tuple[str, str, Any]], path, *, build_messages, parse, fields,
        max_tokens: int = 512, pricing: Pricing | None = None, settings: RunnerSettings | None = None,
        budget: Spend | None = None) -> tuple[dict[str, Record], Spend]:
    """The judge's requests `todo` ((key, kind, data) each) through the runner, resumable by key.

    `parse(kind, data, reply)` returns the verdict, or None (the reply is then retried as
    malformed); `fields(kind, data)` adds to each record. Returns the records of these keys and
    what this call spent (also added to `budget`, the command's account, whose budget limits it)."""
    from persllm_cli.data.store import resume_state

    pricing = pricing or Pricing(backend.model, Price(), False)
    rs = settings or RunnerSettings()
    rs = RunnerSettings(**{**rs.__dict__, "max_tokens": max_tokens, "temperature": 0.0})
    budget = budget if budget is not None else Spend()
    spend = budget.part(priced=pricing.known)

    def parse_(task: Task, c: Completion) -> tuple[Any, str]:
        verdict = parse(task.data[0], task.data[1], c.text)
        if verdict is None:
            raise Malformed("no verdict in the judge's reply")
        return verdict, c.text

    def make_record(task: Task, parsed: tuple[Any, str] | None, usage: Usage, error: str | None) -> Record:
        kind, data = task.data
        verdict, reply = parsed if parsed else (None, None)
        usage_d = usage.as_dict()
        usage_d["cost_usd"] = usage.cost_usd if pricing.known else None   # unrounded: totals add these up
        return {"id": task.id, **fields(kind, data), "verdict": verdict, "reply": reply,
                "judge": usage_d, "status": "ok" if parsed else "failed", "error": error}

    run_items([Task(key, (kind, data)) for key, kind, data in todo], backend,
              build_messages=lambda task: build_messages(task.data[0], task.data[1]), parse=parse_,
              make_record=make_record, output=path, settings=rs, price=pricing.price, spend=spend)
    budget.add(spend)
    state = resume_state(path)
    wanted = {t[0] for t in todo}
    return {k: r for k, r in state.records.items() if k in wanted}, spend


# ---------------------------------------------------------------- classification of test items


@dataclass
class TestQuestion:
    """A test item as the classifier sees it (no answer: the class belongs to the item)."""

    test_id: str
    persona: str
    stage_label: str
    question: str
    reference: str


def class_key(q: TestQuestion, judge_model: str) -> str:
    return verdict_key(q.test_id, "class", judge_model, q.question, q.reference)


def classify(backend: Backend, questions: list[TestQuestion], path, **kw) -> tuple[dict[str, str], dict[str, Record], Spend]:
    """Knowledge, attitude or neither for every test item (asked once, kept in `path`).
    Returns test id -> category (only for items that got one), the records and the spend."""
    todo = [(class_key(q, backend.model), "class", q) for q in questions]

    def build(kind: str, q: TestQuestion) -> list[dict[str, str]]:
        return [{"role": "user", "content": resources.render(
            "eval/judge_classify.txt", persona=q.persona, stage_label=q.stage_label, question=q.question,
            reference=q.reference)}]

    recs, spend = ask(backend, todo, path, build_messages=build,
                      parse=lambda kind, q, text: parse_verdict(text, CATEGORIES),
                      fields=lambda kind, q: {"test_id": q.test_id, "kind": "class"}, **kw)
    out = {}
    for key, _, q in todo:
        r = recs.get(key)
        if r and r.get("status") == "ok":
            out[q.test_id] = r["verdict"]
    return out, recs, spend


# ---------------------------------------------------------------- attitude ranking across systems


LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass
class RankItem:
    """One attitude item and every system's answer to it (system name -> answer)."""

    test_id: str
    persona: str
    stage_label: str
    question: str
    reference: str
    answers: dict[str, str] = field(default_factory=dict)


def shuffled_order(test_id: str, systems: list[str], seed: int) -> list[str]:
    """The order the systems' answers are shown in for this item: a permutation of the sorted
    names, drawn from a generator seeded by (seed, test id), so a rerun shows the same order and
    different items get independent orders (position bias averages out over items)."""
    order = sorted(systems)
    random.Random(f"{seed}|{test_id}").shuffle(order)
    return order


def rank_key(item: RankItem, order: list[str], judge_model: str) -> str:
    return verdict_key(item.test_id, "rank", judge_model, *[part for name in order for part in (name, item.answers[name])])


# "Ranking: B > A = C" (also ">=", "," for ">", markdown around it).
_RANKING = re.compile(r"ranking[\W_]{0,8}?([A-Z](?:\s*[>=,]\s*[A-Z])*)", re.IGNORECASE)


def parse_ranking(text: str, n: int) -> list[list[str]] | None:
    """The judge's ranking of n answers labelled A, B, ... as groups of tied letters, best
    first: "Ranking: B > A = C" -> [["B"], ["A", "C"]]. None unless it names every letter once
    (the last "Ranking:" line counts)."""
    found = _RANKING.findall(text or "")
    if not found:
        return None
    line = found[-1].upper()
    groups = [[x.strip() for x in g.split("=") if x.strip()] for g in re.split(r"[>,]", line)]
    letters = [x for g in groups for x in g]
    if sorted(letters) != list(LETTERS[:n]):
        return None
    return groups


def unshuffle(groups: list[list[str]], order: list[str]) -> dict[str, int]:
    """Letters back to systems: system name -> rank (1 = best; tied systems share the rank, the
    next group's rank is 1 + the number of systems ahead of it)."""
    ranks, ahead = {}, 0
    for g in groups:
        for letter in g:
            ranks[order[LETTERS.index(letter)]] = ahead + 1
        ahead += len(g)
    return ranks


def rank(backend: Backend, items: list[RankItem], path, *, seed: int = 0, **kw) -> tuple[dict[str, dict[str, int]], dict[str, Record], Spend]:
    """Rank the systems' answers to each attitude item together (items with fewer than two
    answers are left out). Returns test id -> {system: rank}, the records and the spend."""
    todo = []
    for item in items:
        if len(item.answers) < 2:
            continue
        order = shuffled_order(item.test_id, list(item.answers), seed)
        todo.append((rank_key(item, order, backend.model), "rank", (item, order)))

    def build(kind: str, data: tuple[RankItem, list[str]]) -> list[dict[str, str]]:
        item, order = data
        shown = "\n\n".join(f"[Answer {LETTERS[k]}]\n{item.answers[name]}" for k, name in enumerate(order))
        example = " > ".join(LETTERS[:len(order)])
        return [{"role": "user", "content": resources.render(
            BY_NAME["attitude"].template, persona=item.persona, stage_label=item.stage_label, question=item.question,
            reference=item.reference, answers=shown, letters=", ".join(LETTERS[:len(order)]), example=example)}]

    def parse(kind: str, data: tuple[RankItem, list[str]], text: str):
        return parse_ranking(text, len(data[1]))

    recs, spend = ask(backend, todo, path, build_messages=build, parse=parse,
                      fields=lambda kind, data: {"test_id": data[0].test_id, "kind": "rank", "order": data[1]}, **kw)
    out = {}
    for key, _, (item, order) in todo:
        r = recs.get(key)
        if r and r.get("status") == "ok":
            out[item.test_id] = unshuffle(r["verdict"], r["order"])
    return out, recs, spend


def total_spend(verdicts: dict[str, Record]) -> Spend:
    """What the verdicts in use cost when they were asked (this run or earlier ones)."""
    total = Spend()
    for r in verdicts.values():
        j = r.get("judge") or {}
        cost = j.get("cost_usd")
        total.charge(cost or 0.0, int(j.get("prompt_tokens") or 0), int(j.get("completion_tokens") or 0),
                     requests=int(j.get("attempts") or 0), priced=cost is not None)
    return total

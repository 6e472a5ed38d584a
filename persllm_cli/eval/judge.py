"""The LLM judge of `persllm eval`: pairwise comparison with the reference, false premises, and
the PersLLM paper's protocols (knowledge score, attitude ranking) plus time leakage.

For every answered test item the judge sees the system's answer and the reference answer twice,
once as A/B and once as B/A; an item counts as a win only when the judge prefers the system's
answer in both orders, a loss only when it prefers the reference in both, else a tie. This cancels
the judge's position bias instead of hiding it (the share of items where both orders agree is
reported as `consistency`). For `error`-pattern items (a question with a false premise) the judge
also answers yes/no: did the answer reject the premise?

The judge is any `llm.Backend`. Verdicts are appended to a JSONL file, one record per request,
keyed by (test id, kind, judge model, answer text), so a rerun only asks what is missing and a
regenerated answer is judged again.

The paper's protocols (see `classify`, `rank` and the `knowledge` / `leak` kinds):
- every test item is first classified once as knowledge, attitude or neither (`class` records,
  keyed by test id, judge model, question and reference);
- a knowledge item's answer gets a 0-5 score of how much of the reference's knowledge it carries
  (`knowledge`, per system);
- an attitude item's answers of all systems are ranked together in one request (`rank`), shown
  in an order shuffled per item with a seeded generator; the record keeps that order so the
  letters are mapped back to systems (ties allowed: a system's rank is 1 + the systems ahead);
- a leak item is a later stage's question asked at an earlier stage: the judge says whether the
  answer reveals what the character only learns later (`leak`, per system). A trained run's
  answer to the same question with no stage token is judged against the same stage too
  (`no_token`), so the two leak rates show what the time tokens do.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field
from statistics import fmean
from typing import Any, Iterable

from persllm_cli.core import resources
from persllm_cli.llm.protocol import Backend, Completion
from persllm_cli.data.records import Record
from persllm_cli.llm.pricing import Price, Pricing, Spend
from persllm_cli.llm.runner import Item as Task, Malformed, RunnerSettings, Usage, run_items

KINDS = ("ab", "ba", "premise")   # ab: the system's answer is A; ba: it is B
CATEGORIES = ("knowledge", "attitude", "neither")
LEAK = "leak"                      # the pattern of a leak item (a later question asked earlier)

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


def task_key(item: Answered, kind: str, judge_model: str) -> str:
    h = hashlib.sha256()
    for part in (item.test_id, kind, judge_model, item.answer):
        h.update(part.encode("utf-8") + b"\0")
    return h.hexdigest()


def prompt(item: Answered, kind: str) -> list[dict[str, str]]:
    common = dict(persona=item.persona, stage_label=item.stage_label, question=item.question)
    if kind == "premise":
        text = resources.render("eval/judge_premise.txt", reference=item.reference, answer=item.answer, **common)
    elif kind == "knowledge":
        text = resources.render("eval/judge_knowledge.txt", reference=item.reference, answer=item.answer, **common)
    elif kind == LEAK:
        text = resources.render("eval/judge_leak.txt", reference=item.reference, answer=item.answer,
                                later_label=item.later_label, **common)
    else:
        a, b = (item.answer, item.reference) if kind == "ab" else (item.reference, item.answer)
        text = resources.render("eval/judge_compare.txt", answer_a=a, answer_b=b, **common)
    return [{"role": "user", "content": text}]


def tasks(items: list[Answered], judge_model: str) -> list[tuple[str, str, Answered]]:
    """(key, kind, item) for every request the judge has to answer, in a fixed order."""
    out = []
    for item in items:
        if item.pattern == LEAK:
            out.append((task_key(item, LEAK, judge_model), LEAK, item))
            continue
        for kind in KINDS:
            if kind == "premise" and item.pattern != "error":
                continue
            out.append((task_key(item, kind, judge_model), kind, item))
        if item.category == "knowledge":
            out.append((task_key(item, "knowledge", judge_model), "knowledge", item))
    return out


def choices(kind: str) -> tuple[str, ...]:
    if kind == "knowledge":
        return tuple(str(k) for k in range(6))
    if kind == "class":
        return CATEGORIES
    return ("yes", "no") if kind in ("premise", LEAK) else ("a", "b", "tie")


def run(backend: Backend, items: list[Answered], path, *, max_tokens: int = 512, pricing: Pricing | None = None,
        settings: RunnerSettings | None = None, budget: Spend | None = None) -> tuple[dict[str, Record], Spend]:
    """Judge every item not judged yet through the concurrent runner (retries, Retry-After,
    accounting; a reply without a verdict is retried like a transient error), appending one
    verdict per request to `path`. Returns the verdicts of these items (old and new, last record
    per key) and what this call spent. Fatal errors (bad key, unknown model) propagate."""
    todo = [(key, kind, item) for key, kind, item in tasks(items, backend.model)]
    return ask(backend, todo, path, build_messages=lambda kind, item: prompt(item, kind),
               parse=lambda kind, item, text: parse_verdict(text, choices(kind)),
               fields=lambda kind, item: {"test_id": item.test_id, "kind": kind},
               max_tokens=max_tokens, pricing=pricing, settings=settings, budget=budget)


def ask(backend: Backend, todo: list[tuple[str, str, Any]], path, *, build_messages, parse, fields,
        max_tokens: int = 512, pricing: Pricing | None = None, settings: RunnerSettings | None = None,
        budget: Spend | None = None) -> tuple[dict[str, Record], Spend]:
    """The judge's requests `todo` ((key, kind, data) each) through the runner, resumable by key.

    `parse(kind, data, reply)` returns the verdict, or None (the reply is then retried as
    malformed); `fields(kind, data)` adds to each record. Returns the records of these keys and
    what this call spent (also added to `budget`, the command's account, whose budget limits it)."""
    from persllm_cli.data.records import resume_state

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
    return _hash(q.test_id, "class", judge_model, q.question, q.reference)


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
    return _hash(item.test_id, "rank", judge_model, *[part for name in order for part in (name, item.answers[name])])


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
            "eval/judge_rank.txt", persona=item.persona, stage_label=item.stage_label, question=item.question,
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


def _hash(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode("utf-8") + b"\0")
    return h.hexdigest()


def total_spend(verdicts: dict[str, Record]) -> Spend:
    """What the verdicts in use cost when they were asked (this run or earlier ones)."""
    total = Spend()
    for r in verdicts.values():
        j = r.get("judge") or {}
        cost = j.get("cost_usd")
        total.charge(cost or 0.0, int(j.get("prompt_tokens") or 0), int(j.get("completion_tokens") or 0),
                     requests=int(j.get("attempts") or 0), priced=cost is not None)
    return total


def summarize(items: list[Answered], verdicts: dict[str, Record], judge_model: str) -> dict[str, Any]:
    """Win/tie/loss against the reference (both orders must agree), consistency, premise rejection,
    the mean knowledge score (0-5) of knowledge items, and the leak rate of leak items (overall and
    per stage the answer was given at), with the stage token and (`leak_notoken_*`) without one.

    `preference` is the mean of per-item scores on 0-100 where one order's vote is worth half:
    100 = always preferred to the reference, 50 = on a par, 0 = never."""
    scores, agree, premise, knowledge, failed = [], 0, [], [], 0
    leaks: dict[str, list[bool]] = {}
    bare: dict[str, list[bool]] = {}     # the same leak questions answered with no stage token
    for item in items:
        def verdict(kind: str) -> str | None:
            r = verdicts.get(task_key(item, kind, judge_model))
            return r.get("verdict") if r and r.get("status") == "ok" else None

        if item.pattern == LEAK:
            v = verdict(LEAK)
            if v is None:
                failed += 1
            else:
                (bare if item.no_token else leaks).setdefault(item.stage, []).append(v == "yes")
            continue
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
        if item.category == "knowledge":
            k = verdict("knowledge")
            if k is None:
                failed += 1
            else:
                knowledge.append(int(k))
    n = len(scores)
    all_leaks = [x for v in leaks.values() for x in v]
    all_bare = [x for v in bare.values() for x in v]

    def by_stage(got: dict[str, list[bool]]) -> dict[str, dict[str, Any]]:
        return {st: {"items": len(v), "leaked": sum(v), "rate": 100 * sum(v) / len(v)} for st, v in got.items()}

    return {
        "items": n,
        "win": 100 * sum(s > 0 for s in scores) / n if n else None,
        "tie": 100 * sum(s == 0 for s in scores) / n if n else None,
        "loss": 100 * sum(s < 0 for s in scores) / n if n else None,
        "preference": 100 * fmean((s + 1) / 2 for s in scores) if n else None,
        "consistency": 100 * agree / n if n else None,
        "premise_items": len(premise),
        "premise_rejected": 100 * sum(premise) / len(premise) if premise else None,
        "knowledge_items": len(knowledge),
        "knowledge_score": fmean(knowledge) if knowledge else None,
        "leak_items": len(all_leaks),
        "leak_rate": 100 * sum(all_leaks) / len(all_leaks) if all_leaks else None,
        "leak_by_stage": by_stage(leaks),
        "leak_notoken_items": len(all_bare),
        "leak_notoken_rate": 100 * sum(all_bare) / len(all_bare) if all_bare else None,
        "leak_notoken_by_stage": by_stage(bare),
        "failed": failed,
    }

"""`persllm converse`: personas talking to each other (the PersLLM paper's multi-agent experiment).

Speakers (speakers.py) take turns round robin, `--first` opening. Each sees the conversation from
its own side: the scene as the opening user message, its own lines as assistant turns, the others'
lines as user turns (prefixed with the speaker's name when more than two talk), consecutive user
lines joined; the history is fitted to each model's context like `chat`. Every line streams to
stdout under its speaker's name as it comes: a trained run's as it is generated, an API persona's
as the server sends it (one request per attempt, with retries and backoff; an attempt that breaks
off mid-line is marked "[cut off]" and the line starts again). An API line's tokens and dollars
are the server's own count (its usage, asked for in the stream), an estimate only when the server
sends none; the record's "tokens_from" says which ("server", "estimate"; "tokenizer" for a run).

Every finished turn is appended to the JSONL transcript (transcript.py) and the markdown beside it
is rewritten; Ctrl-C loses only the turn in progress (exit 130) and a rerun with the same `-o`
carries on. At the end: BLEU between the speakers' lines against BLEU within each speaker's lines
and, with `--judge M`, a verdict per turn on staying in character and in stage.
"""

from __future__ import annotations

import hashlib
import re
import sys
import time
from dataclasses import replace
from itertools import combinations
from pathlib import Path
from typing import Any

from persllm_cli.converse import transcript
from persllm_cli.converse.speakers import Participant, build
from persllm_cli.core import console, resources
from persllm_cli.core.errors import EXIT_PARTIAL, EXIT_USAGE, PersllmError
from persllm_cli.core.project import Project
from persllm_cli.core.settings import public_settings
from persllm_cli.data.lock import hold
from persllm_cli.data.store import Appender, read_jsonl
from persllm_cli.data.sidecars import write_meta
from persllm_cli.data.records import Message
from persllm_cli.llm.pricing import Pricing, Spend, price_table, pricing
from persllm_cli.llm.protocol import RequestError, TransientError, estimate_prompt_tokens, redact_url
from persllm_cli.llm.registry import API, make_backend
from persllm_cli.llm.retry import retrying
from persllm_cli.model.generate import Sampling
from persllm_cli.converse.settings import ConverseSettings

JUDGE_TEMPLATE = "converse/judge.txt"


class BudgetReached(Exception):
    pass


def _allow(spend: Spend, worst: float) -> None:
    """Stop before a request that could take this run's API spend (speakers and judge) past --budget-usd."""
    if not spend.allows(worst):
        raise BudgetReached


# ---------------------------------------------------------------------------------- the turns

def seat(turn: int, first: int, n: int) -> int:
    return (first - 1 + turn) % n


def view(me: int, records: list[dict[str, Any]], scene: str, first: int, n: int) -> list[Message]:
    """The conversation as speaker `me` sees it: the scene, its own lines as the assistant's and the
    others' as the user's (named when more than two talk); consecutive user lines joined."""
    msgs: list[Message] = [{"role": "user", "content": scene}]
    for r in records:
        own = seat(r["turn"], first, n) == me
        role = "assistant" if own else "user"
        text = r["text"].strip() or "..."
        if not own and n > 2:
            text = f"{r['speaker']}: {text}"
        if msgs[-1]["role"] == role:
            msgs[-1] = {"role": role, "content": msgs[-1]["content"] + "\n\n" + text}
        else:
            msgs.append({"role": role, "content": text})
    return msgs


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _with_retries(what: str, call: Any, s: ConverseSettings) -> Any:
    """Call `call()` until it works, under the runner's retry policy (llm/retry.py); what does not
    work in the end is one line."""
    try:
        return retrying(call, max_retries=s.max_retries, base=s.backoff_seconds,
                        on_retry=lambda e: console.note(f"({what}: {e}; retrying)"))
    except TransientError as e:
        raise PersllmError(f"{what}: {e} (after {s.max_retries + 1} attempts); rerun to continue") from None
    except RequestError as e:
        raise PersllmError(f"{what}: {e}") from None


def _run_turn(p: Participant, messages: list[Message], sampling: Sampling) -> tuple[str, int]:
    from persllm_cli.persona.conversation import lstrip_stream

    pieces: list[str] = []
    stream = p.speaker.stream(messages, p.stage_id, sampling)
    try:
        for piece in lstrip_stream(stream):
            pieces.append(piece)
            _write(piece)
    finally:
        stream.close()  # on Ctrl-C: stops the generation thread before the interpreter exits
    text = "".join(pieces).strip()
    tokens = len(p.speaker.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0
    return text, tokens


def _api_turn(p: Participant, messages: list[Message], s: ConverseSettings, price: Pricing,
              spend: Spend) -> tuple[str, int, float | None, str]:
    """One API line, streamed to stdout as it arrives. Returns (text, completion tokens, cost,
    where the token counts come from: "server" or "estimate")."""
    full = p.speaker.messages(messages, p.stage_id)
    _allow(spend, price.price.cost(estimate_prompt_tokens(full), s.max_new_tokens))
    backend = p.speaker.backend
    shown: list[str] = []   # what this attempt has printed

    def show(piece: str) -> None:
        if not shown:
            piece = piece.lstrip()   # the line starts after "NAME: "
            if not piece:
                return
        shown.append(piece)
        _write(piece)

    def ask() -> Any:
        if shown:   # an attempt broke off mid-line: the retry starts the line again
            _write(("" if shown[-1][-1:].isspace() else " ") + "[cut off]\n" + f"{p.name}: ")
            shown.clear()
        c = backend.complete(full, max_tokens=s.max_new_tokens, temperature=s.temperature, on_text=show)
        spend.charge(price.price.cost(c.prompt_tokens, c.completion_tokens), c.prompt_tokens, c.completion_tokens,
                     priced=price.known)
        if not c.text.strip():
            raise TransientError("the model's reply was empty")
        return c

    c = _with_retries(p.name, ask, s)
    text = c.text.strip()
    if not shown:   # a backend that does not stream
        _write(text)
    usage = getattr(c, "usage", "server")
    return text, c.completion_tokens, price.cost(price.price.cost(c.prompt_tokens, c.completion_tokens)), usage


# ---------------------------------------------------------------------------------- the summary

def distinctness(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean BLEU between two lines of the same speaker (within) and of two speakers (between).
    Between well below within: the speakers sound like themselves and not like each other."""
    from persllm_cli.data.metrics import choose_tokenize, group_score, macro, tokenizer

    by: dict[str, list[str]] = {}
    for r in records:
        if r["text"].strip():
            by.setdefault(r["speaker"], []).append(r["text"])
    tok = tokenizer(choose_tokenize([t for v in by.values() for t in v]))
    toks = {k: [tok(t) for t in v] for k, v in by.items()}
    within = [group_score(k, v, None, 2000, 0) for k, v in toks.items()]
    between = [group_score(f"{a} | {b}", toks[a], toks[b], 2000, 0) for a, b in combinations(toks, 2)]
    return {"within": macro(within), "between": macro(between),
            "groups": {"within": [g.__dict__ for g in within], "between": [g.__dict__ for g in between]}}


VERDICT = re.compile(r"in[ _]character\W*(yes|no)\b.*?in[ _]stage\W*(yes|no)\b", re.I | re.S)


def _judge_path(output: Path) -> Path:
    return output.with_name(output.stem + ".judge.jsonl")


def _line_hash(r: dict[str, Any]) -> str:
    return hashlib.sha256(f"{r['turn']}|{r['speaker']}|{r['text']}".encode()).hexdigest()[:16]


def judge_turns(records: list[dict[str, Any]], people: list[Participant], s: ConverseSettings,
                scene: str, project: Project | None, spend: Spend) -> dict[int, dict[str, Any]]:
    """One verdict per turn (kept in FILE.judge.jsonl and reused while the line is unchanged)."""
    assert s.judge
    path = _judge_path(Path(s.output))
    saved = {v["turn"]: v for v in read_jsonl(path, required=False) if v.get("status") == "ok"}
    verdicts = {t: v for t, v in saved.items() if t < len(records) and v.get("hash") == _line_hash(records[t])}
    todo = [r for r in records if r["turn"] not in verdicts]
    if not todo:
        return verdicts
    backend = make_backend(API, s.judge, s.judge_base_url or s.base_url, s.timeout)
    backend.check()
    price = pricing(s.judge, price_table(project))
    n = len(people)
    with Appender(path) as out:
        for r in todo:
            p = people[seat(r["turn"], s.first, n)]
            before = records[max(0, r["turn"] - 2):r["turn"]]
            context = "\n".join(f"{b['speaker']}: {b['text'].strip()}" for b in before) or "(this line opens the conversation)"
            prompt = resources.render(JUDGE_TEMPLATE, persona=p.persona, description=p.speaker.description or "",
                                      stage_label=p.stage_label, stages=", ".join(l for _, l in p.speaker.stages),
                                      scene=scene, context=context, line=r["text"].strip() or "(nothing)").strip()
            msgs = [{"role": "user", "content": prompt}]
            _allow(spend, price.price.cost(estimate_prompt_tokens(msgs), 200))

            def ask(msgs: list[Message] = msgs) -> Any:
                c = backend.complete(msgs, max_tokens=200, temperature=0.0)
                spend.charge(price.price.cost(c.prompt_tokens, c.completion_tokens), c.prompt_tokens,
                             c.completion_tokens, priced=price.known)
                m = VERDICT.search(c.text)
                if not m:
                    raise TransientError("the judge's reply had no verdict")
                return m, c

            m, c = _with_retries(f"judge {s.judge}", ask, s)
            v = {"turn": r["turn"], "hash": _line_hash(r), "speaker": r["speaker"], "status": "ok",
                 "in_character": m.group(1).lower(), "in_stage": m.group(2).lower(), "reply": c.text.strip()}
            out.append(v)
            verdicts[r["turn"]] = v
    return verdicts


def summarize(records: list[dict[str, Any]], people: list[Participant],
              verdicts: dict[int, dict[str, Any]] | None, spend: Spend) -> list[str]:
    """The summary: printed as a table on stderr, returned as markdown lines."""
    def fmt(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.2f}"

    d = distinctness(records)
    rows: list[list[object]] = [["turns", len(records)],
                                ["BLEU within a speaker (mean)", fmt(d["within"])],
                                ["BLEU between speakers (mean)", fmt(d["between"])]]
    md = [f"- {len(records)} turns",
          f"- BLEU within each speaker's lines: {fmt(d['within'])}; between speakers: {fmt(d['between'])} "
          "(lower between than within: the speakers are distinct)"]
    if d["between"] is not None and d["within"] is not None:
        verdict = "distinct" if d["between"] < d["within"] else "not distinct (they echo each other)"
        rows.append(["speakers", verdict])
    if verdicts is not None:
        for p in people:
            mine = [verdicts[r["turn"]] for r in records if r["speaker"] == p.name and r["turn"] in verdicts]
            if not mine:
                continue
            ch = sum(v["in_character"] == "yes" for v in mine)
            st = sum(v["in_stage"] == "yes" for v in mine)
            rows.append([f"judge: {p.name}", f"in character {ch}/{len(mine)}, in stage {st}/{len(mine)}"])
            md.append(f"- judge, {p.name}: in character {ch}/{len(mine)}, in stage {st}/{len(mine)}")
    cost = sum(r.get("cost") or 0.0 for r in records)
    rows.append(["API cost of the transcript", f"${cost:.4f}"])
    if spend.requests:
        rows.append(["API requests this run", spend.requests])
        rows.append(["spent this run", f"${spend.usd:.4f}"])
    console.table("converse", ["", "value"], rows)
    return md


# ---------------------------------------------------------------------------------- the command

def _dry_run(people: list[Participant], records: list[dict[str, Any]], scene: str, s: ConverseSettings,
             project: Project | None) -> int:
    """What the API turns still to come would send, with every line as long as it may be."""
    from persllm_cli.llm.progress import dry_run

    n = len(people)
    filler = " ".join(["word"] * s.max_new_tokens)
    fake = list(records)
    prompts: dict[str, list[list[Message]]] = {}
    for i in range(len(records), s.turns):
        p = people[seat(i, s.first, n)]
        if p.kind == "api":
            msgs = p.speaker.messages(view(seat(i, s.first, n), fake, scene, s.first, n), p.stage_id)
            prompts.setdefault(p.model, []).append(msgs)
        fake.append({"turn": i, "speaker": p.name, "text": filler})
    if s.judge:
        prompts.setdefault(s.judge, []).extend([[{"role": "user", "content": filler * 3}]] * s.turns)
    if not prompts:
        console.info(f"dry run: no API speaker; {max(0, s.turns - len(records))} turn(s) to go, all on this machine ($0)")
    for model, msgs in prompts.items():
        price = pricing(model, price_table(project))
        if price.note:
            console.note(price.note)
        dry_run(f"converse {model}", msgs, len(records), s.max_new_tokens, price.price)
    return 0


def run(project: Project | None, s: ConverseSettings) -> int:
    """Check the speakers, then talk (or only estimate with --dry-run), holding the transcript's lock."""
    if s.dry_run:
        return _converse(project, s)
    # One conversation per transcript: a second run says who holds it (or waits with --wait).
    with hold(Path(s.output)):
        return _converse(project, s)


def _converse(project: Project | None, s: ConverseSettings) -> int:
    t0 = time.perf_counter()
    specs = list(s.speakers or [])
    if len(specs) < 2:
        raise PersllmError("converse needs at least two speakers, e.g. runs/latest@early runs/latest@late",
                           exit_code=EXIT_USAGE)
    if s.first > len(specs):
        raise PersllmError(f"--first {s.first}: there are only {len(specs)} speakers", exit_code=EXIT_USAGE)
    sampling = Sampling(max_new_tokens=s.max_new_tokens, temperature=s.temperature, seed=s.seed,
                        no_repeat_ngram=s.no_repeat_ngram)
    people = build(specs, project, sampling, s.base_url, s.timeout)
    n = len(people)
    output = Path(s.output)
    records = transcript.load(output, repair=not s.dry_run)
    specs_at = [people[seat(i, s.first, n)].spec.text for i in range(max(s.turns, len(records)))]
    scene = transcript.check_continues(output, records, s.scene, specs_at)
    described = [p.describe() for p in people]
    if s.dry_run:
        return _dry_run(people, records, scene, s, project)

    todo = range(len(records), s.turns)
    if todo:
        for p in {id(p.speaker): p for p in people}.values():
            if p.kind == "run":
                console.note(f"Loading {p.speaker.info.path} (base {p.speaker.info.base})...")
                p.speaker.load()
            else:
                p.speaker.backend.check()
    prices = {p.model: pricing(p.model, price_table(project)) for p in people if p.kind == "api"}
    spend = Spend(budget_usd=s.budget_usd)
    for m in sorted(m for m, pr in prices.items() if not pr.known):
        console.note(prices[m].note)

    console.info(f"Scene: {scene}")
    if records:
        console.note(f"(continuing {output.name} after turn {len(records)} of {s.turns})")
        for r in records:
            _write(f"{r['speaker']}: {r['text'].strip()}\n\n")
    stopped: str | None = None
    said_dropped: set[str] = set()
    appender = Appender(output) if todo else None
    try:
        for i in todo:
            me = seat(i, s.first, n)
            p = people[me]
            messages, dropped = p.speaker.fit(view(me, records, scene, s.first, n), p.stage_id, sampling)
            if dropped and p.name not in said_dropped:
                said_dropped.add(p.name)
                console.note(f"(the conversation outgrew {p.name}'s context: its oldest turns are dropped from now on)")
            _write(f"{p.name}: ")
            started = time.perf_counter()
            if p.kind == "run":
                # A fixed --seed makes the conversation repeatable, but each turn its own draw.
                turn_sampling = replace(sampling, seed=None if s.seed is None else s.seed + i)
                text, tokens = _run_turn(p, messages, turn_sampling)
                cost: float | None = 0.0
                counted = "tokenizer"
            else:
                try:
                    text, tokens, cost, counted = _api_turn(p, messages, s, prices[p.model], spend)
                except BudgetReached:
                    _write("\n")
                    stopped = "budget"
                    console.warn(f"stopping before turn {i + 1}: it could pass --budget-usd {s.budget_usd} "
                                 f"(${spend.usd:.4f} spent this run); rerun with a larger budget to continue")
                    break
            _write("\n\n")
            record = {"turn": i, "speaker": p.name, "spec": p.spec.text, "kind": p.kind, "model": p.model,
                      "persona": p.persona, "stage": p.stage_id, "stage_label": p.stage_label, "text": text,
                      "tokens": tokens, "tokens_from": counted, "seconds": round(time.perf_counter() - started, 3), "cost": cost}
            if i == 0:
                record["scene"] = scene
            assert appender is not None
            appender.append(record)
            records.append(record)
            transcript.write_markdown(output, transcript.render_markdown(records, scene, described))
    except KeyboardInterrupt:
        _write("\n")
        stopped = "interrupted"
        raise
    finally:
        if appender is not None:
            appender.close()
        _meta(output, s, described, records, spend, time.perf_counter() - t0, stopped)
        if records and not output.with_suffix(".md").exists():
            transcript.write_markdown(output, transcript.render_markdown(records, scene, described))

    verdicts = None
    if s.judge and records and stopped is None:
        try:
            verdicts = judge_turns(records, people, s, scene, project, spend)
        except BudgetReached:
            stopped = "budget"
            console.warn(f"the judge stopped before passing --budget-usd {s.budget_usd}; rerun to judge the rest")
            verdicts = {v["turn"]: v for v in read_jsonl(_judge_path(output), required=False) if v.get("status") == "ok"}
    summary = summarize(records, people, verdicts, spend) if records else []
    transcript.write_markdown(output, transcript.render_markdown(records, scene, described, summary, verdicts))
    console.info(f"Transcript: {output} and {transcript.markdown_path(output)}")
    return EXIT_PARTIAL if stopped else 0


def _meta(output: Path, s: ConverseSettings, speakers: list[dict[str, Any]], records: list[dict[str, Any]],
          spend: Spend, seconds: float, stopped: str | None) -> None:
    if not output.exists():
        return
    settings = public_settings(s)
    if settings.get("base_url"):
        settings["base_url"] = redact_url(settings["base_url"])
    write_meta(output, command="converse", settings=settings, counts={"turns": len(records)}, seconds=seconds,
               extra={"speakers": speakers, "last_run": {"requests": spend.requests, "cost_usd": round(spend.usd, 6),
                                                         "stopped": stopped}})

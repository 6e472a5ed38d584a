"""`persllm dpo --mode generate`: rejected answers written by the annotator from another stage.

For each record, the annotator answers the record's question as the persona at *another* stage,
from that stage's material (the original's option 4). The chosen answer is the record's own; the
rejected one is the same persona speaking from the wrong point in time, which is what the time
tokens must teach the model to tell apart.

Which stage: the chronologically nearest other stage; when two are equally near (a middle stage),
the record's id decides, so the choice is fixed for a record and spread evenly over both.

The material: the other stage's knowledge and style paragraphs most similar to the question
(TF-IDF), within a word budget, most similar first.

The run (`run`): the annotator is the one `annotate` uses (dpo's --backend/--model/--base-url/
--concurrency, else the project's [annotate] settings; the key only from OPENAI_API_KEY). The
concurrent runner appends every raw answer to build/dpo.generate.jsonl (next to -o; one record per
chosen record and answering stage, `ok` or `failed`), so a rerun asks only what is not `ok` yet.
The pairs are then written atomically from the `ok` answers; provenance `rejected_id` is the work
record's id.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from persllm_cli.core import console
from persllm_cli.data import records
from persllm_cli.data import store
from persllm_cli.data.lock import hold
from persllm_cli.core.project import Project, Stage
from persllm_cli.data.corpus import Paragraph, read_paragraphs
from persllm_cli.data.curation import normalise
from persllm_cli.core.errors import EXIT_PARTIAL, PersllmError
from persllm_cli.data.records import Message, Record
from persllm_cli.core.resources import render
from persllm_cli.data.retrieval import Index
from persllm_cli.curate.pairs import load_inputs, make_pair, pair_id, report
from persllm_cli.curate.settings import DpoSettings
from persllm_cli.llm.annotator import AnnotateSettings
from persllm_cli.llm.pricing import Spend, pricing
from persllm_cli.llm.progress import dry_run, summary
from persllm_cli.llm.registry import default_model, make_backend
from persllm_cli.llm.runner import Item, Malformed, RunnerSettings, pending, run_items

EMPTY_ANSWER = "the annotator's answer was empty"
SAME_ANSWER = "the generated answer equals the chosen one"
FAILED = "the request failed after retries (rerun to retry)"
NOT_ANSWERED = "not sent yet (rerun to continue)"


def other_stage(project: Project, stage_id: str, record_id: str) -> Stage:
    """The chronologically nearest other stage (ties split by the record id)."""
    here = project.stage(stage_id)
    others = [s for s in project.stages if s.id != here.id]
    if not others:
        raise PersllmError(f"the project has only stage {here.id!r}: --mode generate needs another stage's material")
    nearest = min(abs(s.index - here.index) for s in others)
    tied = [s for s in others if abs(s.index - here.index) == nearest]
    return tied[int(record_id[:8], 16) % len(tied)] if len(tied) > 1 else tied[0]


class StageMaterial:
    """One stage's knowledge and style paragraphs, indexed once, to pick those nearest a question."""

    def __init__(self, knowledge: list[Paragraph], style: list[Paragraph]):
        self.knowledge = Index(knowledge)
        self.style = Index(style)

    @classmethod
    def load(cls, project: Project, stage: Stage) -> "StageMaterial":
        return cls(read_paragraphs(project.knowledge_file(stage)),
                   read_paragraphs(project.style_file(stage), required=False))

    @staticmethod
    def nearest(index: Index, question: str, budget_words: int) -> str:
        if budget_words <= 0:
            return ""
        return "\n".join(index.text(index.context(question, budget_words)))


def build_messages(project: Project, stage: Stage, material: StageMaterial, question: str,
                   knowledge_words: int = 1000, style_words: int = 300) -> list[Message]:
    description = f", {project.description}" if project.description else ""
    prompt = render("dpo/generate.txt", persona=project.name, description_part=description,
                    stage_line=f"Now it is {stage.label}.",
                    knowledge=StageMaterial.nearest(material.knowledge, question, knowledge_words) or "(none)",
                    style=StageMaterial.nearest(material.style, question, style_words) or "(none)",
                    question=question)
    return [{"role": "user", "content": prompt}]


_ANSWER_LABEL = re.compile(r"^\s*(?:\*\*)?\[(?:Response|Answer)\](?:\*\*)?:?[ \t]*", re.IGNORECASE | re.MULTILINE)


def clean_answer(text: str) -> str:
    """The reply's answer: the text after the last `[Response]`/`[Answer]` label when the model
    added one anyway (perhaps after echoing the `[Question]`), else the whole reply."""
    labels = list(_ANSWER_LABEL.finditer(text))
    return (text[labels[-1].end():] if labels else text).strip()


@dataclass
class Planned:
    """One request: the record whose question is asked, the stage that answers, the prompt."""

    id: str            # the pair's id (stable: a rerun can skip it)
    record: Record
    stage: Stage
    messages: list[Message]


def plan(inputs: Iterable[Record], project: Project) -> list[Planned]:
    """The request for each record: which other stage answers it, from what material."""
    materials: dict[str, StageMaterial] = {}
    out = []
    for r in inputs:
        stage = other_stage(project, r["stage"], r["id"])
        if stage.id not in materials:
            materials[stage.id] = StageMaterial.load(project, stage)
        out.append(Planned(pair_id(r["id"], "generate"), r, stage,
                           build_messages(project, stage, materials[stage.id], records.question(r))))
    return out


def to_pair(p: Planned, reply: str, project: Project, rejected_id: str | None = None) -> tuple[Record | None, str]:
    """The pair for a reply, or (None, why) when the reply cannot be a rejected answer."""
    text = clean_answer(reply)
    if not text:
        return None, EMPTY_ANSWER
    if normalise(text) == normalise(records.answer(p.record)):
        return None, SAME_ANSWER
    return make_pair(p.record, text, rejected_id=rejected_id, rejected_stage=p.stage.id,
                     rejected_persona=p.record.get("persona") or project.name, similarity=None,
                     mode="generate"), ""


def generate_pairs(inputs: Iterable[Record], project: Project, answer: Callable[[list[Message]], str],
                   ) -> tuple[list[Record], dict[str, str]]:
    """One pair per record whose generated answer is usable; the ids of the others, with why.

    `answer(messages) -> text` asks the annotator (any backend), one request at a time; the
    concurrent, resumable run uses `plan` and `to_pair` the same way (see `run`).
    """
    pairs: list[Record] = []
    missing: dict[str, str] = {}
    for p in plan(inputs, project):
        pair, why = to_pair(p, answer(p.messages), project)
        if pair is None:
            missing[p.record["id"]] = why
        else:
            pairs.append(pair)
    return pairs, missing


def work_id(chosen_id: str, stage_id: str) -> str:
    """The id of one request in the work file: the chosen record and the stage that answers (so a
    project whose stages changed asks again instead of reusing an answer from the wrong stage)."""
    return hashlib.sha256(f"dpo|generate|{chosen_id}|{stage_id}".encode("utf-8")).hexdigest()


def work_path(output: Path) -> Path:
    """build/dpo.jsonl -> build/dpo.generate.jsonl: the append-only file of raw answers."""
    output = Path(output)
    return output.with_name(f"{output.stem}.generate{output.suffix or '.jsonl'}")


@dataclass
class Client:
    """The annotator this mode asks: dpo flags first, else the project's [annotate]."""

    backend: str
    model: str
    base_url: str | None
    concurrency: int
    settings: AnnotateSettings  # retries, timeout, max_tokens, prices, ...

    @classmethod
    def choose(cls, s: DpoSettings, a: AnnotateSettings) -> "Client":
        backend = s.backend or a.backend
        # [annotate] model belongs to [annotate] backend: a different --backend takes its own default.
        same = backend == a.backend
        model = s.model or (a.model if same else None) or default_model(backend)
        base_url = s.base_url or (a.base_url if same else None)
        concurrency = s.concurrency if s.concurrency is not None else a.concurrency
        return cls(backend, model, base_url, concurrency, a)

    def public(self) -> dict[str, Any]:
        from persllm_cli.llm.protocol import redact_url

        return {"backend": self.backend, "model": self.model,
                "base_url": redact_url(self.base_url) if self.base_url else None,
                "concurrency": self.concurrency, "max_retries": self.settings.max_retries,
                "max_tokens": self.settings.max_tokens, "temperature": self.settings.temperature}


def _parse(item: Item, completion: Any) -> str:
    text = clean_answer(completion.text)
    if not text:
        raise Malformed(EMPTY_ANSWER)
    return text


def _work_record(item: Item, text: str | None, usage: Any, error: str | None) -> Record:
    p: Planned = item.data
    return {"id": item.id, "chosen_id": p.record["id"], "stage": p.record["stage"], "rejected_stage": p.stage.id,
            "text": text, "annotator": usage.as_dict(), "status": "ok" if text is not None else "failed",
            "error": error}


def run(project: Project, s: DpoSettings, annotator: AnnotateSettings) -> int:
    """Ask the annotator for the rejected answers (resumable), then write the pairs; the exit code."""
    from persllm_cli.llm import batch_command

    started = time.perf_counter()
    inputs, _, _ = load_inputs(project, s)
    if s.pool:
        console.note("--pool is not used by --mode generate (the annotator writes the rejected answers)")
    ann = Client.choose(s, annotator)
    mode = batch_command.chosen(s, backend=ann.backend, dry_run=s.dry_run)
    planned = plan(inputs, project)
    items = [Item(work_id(p.record["id"], p.stage.id), p) for p in planned]
    work = work_path(s.output)
    a = ann.settings
    cost = pricing(ann.model, a.prices, backend=ann.backend)
    price = cost.price

    budget = s.budget_usd if s.budget_usd is not None else a.budget_usd
    if mode is not None:
        from persllm_cli.curate import dpo_batch

        return dpo_batch.run(mode, project, s, ann, inputs, items, work, budget, started,
                             parse=_parse, make_record=_work_record, write_pairs=write_pairs)
    if s.dry_run:
        todo, skipped = pending(items, work)
        dry_run(ann.model, [it.data.messages for it in todo], skipped, a.max_tokens, price)
        if cost.note:
            console.note(cost.note)
        return 0

    # One writer per output: a second run exits 1 (or waits with --wait) instead of paying twice.
    with hold(s.output):
        backend = make_backend(ann.backend, ann.model, ann.base_url, a.timeout)
        backend.check()
        rs = RunnerSettings(concurrency=ann.concurrency, max_retries=a.max_retries, max_tokens=a.max_tokens,
                            temperature=a.temperature, backoff_base=a.backoff_seconds, title="dpo generate")
        stats = run_items(items, backend, build_messages=lambda it: it.data.messages, parse=_parse,
                          make_record=_work_record, output=work, settings=rs, price=price,
                          spend=Spend(budget_usd=budget))
        if stats.planned == 0 and stats.skipped:
            console.info(f"nothing to ask: all {stats.skipped} answers are already in {work}")
        else:
            summary(stats, "dpo --mode generate")
        if cost.note:
            console.note(cost.note)
        if stats.stopped == "budget":
            console.warn(f"budget of ${budget} reached: {stats.not_sent} request(s) not sent; "
                         "rerun with a higher --budget-usd to continue")
        return write_pairs(project, s, ann, inputs, items, work, price, started, stats.as_dict())


def write_pairs(project: Project, s: DpoSettings, ann: Client, inputs: list[Record], items: list[Item], work: Path,
                price: Any, started: float, last_run: dict[str, Any]) -> int:
    """The pairs from the `ok` answers in the work file (after a live run or a batch's import);
    the exit code: 3 while requests failed or are not sent yet."""
    from persllm_cli.core.settings import public_settings

    done = store.resume_state(work).records if work.exists() else {}
    pairs: list[Record] = []
    missing: dict[str, str] = {}
    not_ok = 0
    for it in items:
        p: Planned = it.data
        w = done.get(it.id)
        if w is None or w.get("status") != "ok":
            not_ok += 1
            missing[p.record["id"]] = NOT_ANSWERED if w is None else FAILED
            continue
        pair, why = to_pair(p, str(w.get("text") or ""), project, rejected_id=it.id)
        if pair is None:
            missing[p.record["id"]] = why
        else:
            pairs.append(pair)
    if not pairs:
        if not_ok:
            console.warn(f"no pair yet: {not_ok} request(s) failed or were not sent; rerun to retry them "
                         f"(answers so far are kept in {work})")
            return EXIT_PARTIAL
        raise PersllmError(f"no generated answer differs from the chosen one ({len(missing)} record(s)); "
                           "nothing written")
    settings = public_settings(s)
    settings.update(ann.public())
    report(project, s, inputs, pairs, missing, pool_records=0, unusable_pool=0,
           seconds=time.perf_counter() - started, settings=settings,
           extra={"work_file": str(work), "price_per_million": [price.input, price.output], "last_run": last_run})
    if not_ok:
        console.warn(f"{not_ok} request(s) failed or were not sent; rerun to retry them")
        return EXIT_PARTIAL
    return 0

"""`persllm dpo --mode generate`: rejected answers written by the annotator from another stage.

For each record, the annotator answers the record's question as the persona at *another* stage,
from that stage's material (the original's option 4). The chosen answer is the record's own; the
rejected one is the same persona speaking from the wrong point in time, which is what the time
tokens must teach the model to tell apart.

Which stage: the chronologically nearest other stage; when two are equally near (a middle stage),
the record's id decides, so the choice is fixed for a record and spread evenly over both.

The material: the other stage's knowledge and style paragraphs most similar to the question
(TF-IDF), within a word budget, most similar first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

from persllm_cli import records
from persllm_cli.config import Project, Stage
from persllm_cli.corpus import count_words, read_paragraphs
from persllm_cli.curation import normalise
from persllm_cli.errors import PersllmError
from persllm_cli.records import Record
from persllm_cli.resources import render

Message = dict[str, str]
EMPTY_ANSWER = "the annotator's answer was empty"
SAME_ANSWER = "the generated answer equals the chosen one"


def other_stage(project: Project, stage_id: str, record_id: str) -> Stage:
    """The chronologically nearest other stage (ties split by the record id)."""
    here = project.stage(stage_id)
    others = [s for s in project.stages if s.id != here.id]
    if not others:
        raise PersllmError(f"the project has only stage {here.id!r}: --mode generate needs another stage's material")
    nearest = min(abs(s.index - here.index) for s in others)
    tied = [s for s in others if abs(s.index - here.index) == nearest]
    return tied[int(record_id[:8], 16) % len(tied)] if len(tied) > 1 else tied[0]


@dataclass
class StageMaterial:
    """One stage's paragraphs and a TF-IDF index to pick those nearest a question."""

    knowledge: list[str]
    style: list[str]

    @classmethod
    def load(cls, project: Project, stage: Stage) -> "StageMaterial":
        knowledge = [p.text for p in read_paragraphs(project.knowledge_file(stage))]
        style = [p.text for p in read_paragraphs(project.style_file(stage), required=False)]
        return cls(knowledge, style)

    @staticmethod
    def nearest(paragraphs: list[str], question: str, budget_words: int) -> str:
        if not paragraphs or budget_words <= 0:
            return ""
        from persllm_cli.embedding import get_embedder

        emb = get_embedder("tfidf").fit(paragraphs + [question])
        sims = (emb.transform(paragraphs) @ emb.transform([question]).T).toarray().ravel()
        picked, words = [], 0
        for i in sorted(range(len(paragraphs)), key=lambda i: (-sims[i], i)):
            n = count_words(paragraphs[i])
            if picked and words + n > budget_words:
                break
            picked.append(paragraphs[i])
            words += n
        return "\n".join(picked)


def build_messages(project: Project, stage: Stage, material: StageMaterial, question: str,
                   knowledge_words: int = 1000, style_words: int = 300) -> list[Message]:
    description = f", {project.description}" if project.description else ""
    prompt = render("dpo/generate.txt", persona=project.name, description_part=description,
                    stage_line=f"Now it is {stage.label}.",
                    knowledge=StageMaterial.nearest(material.knowledge, question, knowledge_words) or "(none)",
                    style=StageMaterial.nearest(material.style, question, style_words) or "(none)",
                    question=question)
    return [{"role": "user", "content": prompt}]


def clean_answer(text: str) -> str:
    """The reply without a `[Response]`/`[Answer]` label the model may have added anyway."""
    t = text.strip()
    for label in ("[Response]", "[Answer]", "**[Response]**", "**[Answer]**"):
        if t.startswith(label):
            t = t[len(label):].strip()
    return t


@dataclass
class Planned:
    """One request: the record whose question is asked, the stage that answers, the prompt."""

    id: str            # the pair's id (stable: a rerun can skip it)
    record: Record
    stage: Stage
    messages: list[Message]


def plan(inputs: Iterable[Record], project: Project) -> list[Planned]:
    """The request for each record: which other stage answers it, from what material."""
    from persllm_cli.dpo import pair_id

    materials: dict[str, StageMaterial] = {}
    out = []
    for r in inputs:
        stage = other_stage(project, r["stage"], r["id"])
        if stage.id not in materials:
            materials[stage.id] = StageMaterial.load(project, stage)
        out.append(Planned(pair_id(r["id"], "generate"), r, stage,
                           build_messages(project, stage, materials[stage.id], records.question(r))))
    return out


def to_pair(p: Planned, reply: str, project: Project) -> tuple[Record | None, str]:
    """The pair for a reply, or (None, why) when the reply cannot be a rejected answer."""
    from persllm_cli.dpo import make_pair

    text = clean_answer(reply)
    if not text:
        return None, EMPTY_ANSWER
    if normalise(text) == normalise(records.answer(p.record)):
        return None, SAME_ANSWER
    return make_pair(p.record, text, rejected_id=None, rejected_stage=p.stage.id,
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


def run(project: Project, s) -> int:
    # TODO(runner): wire this mode to the annotator backend and the concurrent runner of the annotate
    # work (persllm_cli.llm.make_backend, persllm_cli.runner.run_items), which are not on this branch:
    #   1. read and check the input as retrieve does (dpo.load_inputs), `plan(inputs, project)`;
    #   2. backend = make_backend(s.backend or [annotate] backend, s.model or [annotate] model,
    #      s.base_url or [annotate] base_url); RunnerSettings(concurrency=s.concurrency or 8, ...);
    #   3. run_items(Item(p.id, p) ..., build_messages=lambda it: it.data.messages,
    #      parse=lambda it, c: clean_answer(c.text) or raise Malformed, make_record=a raw record
    #      {id, status, rejected text, annotator usage}, output=<output>.generate.jsonl): append-only,
    #      so a rerun skips pair ids already ok and retries failed ones, like annotate;
    #   4. build the pairs with `to_pair` from the ok raw records, write s.output atomically and its
    #      sidecar with dpo.report (records without a usable reply counted, not invented); exit 3
    #      when some requests failed after retries.
    # Until then the mode says so and exits 1, writing nothing.
    raise PersllmError("dpo --mode generate is not available in this build yet (it needs the annotator "
                       "runner); use --mode retrieve")

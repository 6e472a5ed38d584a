"""`persllm dpo`: chosen/rejected preference pairs in TRL's conversational format, with provenance.

--mode retrieve (the original's automatic DPO): for each record, chosen = its own answer; the
candidates are the records of the other stages of the same persona in the input, and the records of
the --pool files (other personas). They are ranked by how similar their question is to this one
(ties: file order), the --skip nearest are passed over (too close: they may be the same question,
whose answer would be a fair answer too), and the first whose answer differs (after normalising
case, punctuation and spaces) is the rejected one. A record with no such candidate gets no pair:
it is counted and reported, never made up.

--mode generate: the rejected answer is written by the annotator, answering the question as the
persona at another stage, from that stage's material (persllm_cli/dpo_generate.py).

Output: {"id", "stage", "prompt": [messages before the answer], "chosen": [assistant message],
"rejected": [assistant message], "provenance": {"chosen_id", "rejected_id", "rejected_stage",
"rejected_persona", "similarity", "mode"}}.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from persllm_cli.core import console
from persllm_cli.data import records
from persllm_cli.core.project import Project
from persllm_cli.core.settings import public_settings, setting
from persllm_cli.data.curation import check_usable, latest, normalise, persona, read_numbered, stage_order
from persllm_cli.core.errors import PersllmError
from persllm_cli.llm.backends import BACKENDS
from persllm_cli.data.records import Record

MODES = ("retrieve", "generate")
NO_CANDIDATE = "no candidate past --skip"
SAME_ANSWER = "every candidate gives the same answer"


@dataclass
class DpoSettings:
    input: Path = Path("build/train.jsonl")
    pool: list[Path] = field(default_factory=list)
    skip: int = setting(5, at_least=0)
    mode: str = setting("retrieve", choices=MODES)
    output: Path = Path("build/dpo.jsonl")
    backend: str | None = setting(None, choices=BACKENDS)
    model: str | None = None
    base_url: str | None = None
    concurrency: int | None = setting(None, at_least=1)
    budget_usd: float | None = setting(None, at_least=0)  # --mode generate; else [annotate] budget_usd
    dry_run: bool = False             # --mode generate
    embedder: str = "tfidf"  # question similarity for --mode retrieve


@dataclass
class Candidate:
    record: Record
    persona: str
    stage: str
    answer_key: str  # the normalised answer


def pair_id(chosen_id: str, mode: str) -> str:
    return hashlib.sha256(f"dpo|{mode}|{chosen_id}".encode("utf-8")).hexdigest()


def prompt_messages(r: Record) -> list[dict[str, str]]:
    """The conversation up to (not including) the last assistant message."""
    msgs = [m for m in r["messages"]
            if isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)]
    last = max(i for i, m in enumerate(msgs) if m.get("role") == "assistant")
    return [{"role": m["role"], "content": m["content"]} for m in msgs[:last]]


def make_pair(chosen: Record, rejected_text: str, *, rejected_id: str | None, rejected_stage: str,
              rejected_persona: str, similarity: float | None, mode: str) -> Record:
    return {
        "id": pair_id(chosen["id"], mode),
        "stage": chosen["stage"],
        "prompt": prompt_messages(chosen),
        "chosen": [{"role": "assistant", "content": records.answer(chosen)}],
        "rejected": [{"role": "assistant", "content": rejected_text}],
        "provenance": {"chosen_id": chosen["id"], "rejected_id": rejected_id, "rejected_stage": rejected_stage,
                       "rejected_persona": rejected_persona,
                       "similarity": None if similarity is None else round(float(similarity), 6), "mode": mode},
    }


def load_inputs(project: Project, s: DpoSettings) -> tuple[list[Record], list[Candidate], int]:
    """Input records (checked), then the candidate universe: the input's records followed by the
    usable records of the pool files. Returns (inputs, universe, unusable pool records)."""
    numbered = read_numbered(s.input)
    check_usable(s.input, numbered, "dpo reads clean records (the output of `persllm split`)", project)
    inputs = [r for _, r in latest(numbered)[0]]
    universe = [Candidate(r, persona(r, project.name), r["stage"], normalise(records.answer(r))) for r in inputs]
    unusable = 0
    for path in s.pool:
        pool, _, _ = latest(read_numbered(path, what="pool records"))
        for _, r in pool:
            if records.unusable_reason(r) or not isinstance(r.get("stage"), str):
                unusable += 1
                continue
            universe.append(Candidate(r, persona(r, f"pool:{Path(path).name}"), r["stage"],
                                      normalise(records.answer(r))))
    return inputs, universe, unusable


def similarity_rows(vectors: Any, rows: range, groups: np.ndarray) -> np.ndarray:
    """Dense similarities of `rows` against every candidate; the row's own group is -inf."""
    block = vectors[rows.start:rows.stop] @ vectors.T
    block = block.toarray() if hasattr(block, "toarray") else np.asarray(block)
    block = block.astype(np.float32, copy=False)
    block[groups[rows.start:rows.stop, None] == groups[None, :]] = -np.inf
    return block


def ranked(sims: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k most similar candidates, most similar first, ties in file order."""
    k = min(k, len(sims))
    top = np.argpartition(-sims, k - 1)[:k] if k < len(sims) else np.arange(len(sims))
    return top[np.lexsort((top, -sims[top]))]


def pick_rejected(sims: np.ndarray, universe: list[Candidate], chosen_key: str, skip: int,
                  valid: int) -> tuple[int | None, str]:
    """The first candidate past the `skip` nearest whose answer differs: (index, "") or (None, why).

    `valid`: how many candidates the row has (those of other groups; the rest are -inf)."""
    if valid <= skip:
        return None, NO_CANDIDATE
    k = skip + 32
    order = ranked(sims, k)
    while True:
        for j in order[skip:].tolist():
            if not np.isfinite(sims[j]):
                return None, SAME_ANSWER
            if universe[j].answer_key != chosen_key:
                return j, ""
        if len(order) >= valid:
            return None, SAME_ANSWER
        k *= 4  # rare: many near candidates share the answer; look further
        order = ranked(sims, k)


def retrieve_pairs(inputs: list[Record], universe: list[Candidate], skip: int,
                   embedder: str = "tfidf") -> tuple[list[Record], dict[str, str]]:
    """Pairs for every input record that has a usable rejected answer, and why the others have none."""
    from persllm_cli.data.embedding import get_embedder

    keys = {(c.persona, c.stage) for c in universe}
    group_of = {k: i for i, k in enumerate(sorted(keys))}
    groups = np.array([group_of[(c.persona, c.stage)] for c in universe])
    outside = len(universe) - np.bincount(groups)  # candidates per group: everyone outside it
    questions = [records.question(c.record) for c in universe]
    vectors = get_embedder(embedder).fit(questions).transform(questions)
    if hasattr(vectors, "tocsr"):
        vectors = vectors.tocsr()
    block = max(1, min(512, 20_000_000 // max(1, len(universe))))  # about 80 MB of similarities at once
    pairs: list[Record] = []
    missing: dict[str, str] = {}
    with console.progress() as bar:
        task = bar.add_task("retrieving rejected answers", total=len(inputs))
        for start in range(0, len(inputs), block):
            rows = range(start, min(len(inputs), start + block))
            sims = similarity_rows(vectors, rows, groups)
            for r_i, i in enumerate(rows):
                chosen = universe[i]
                j, why = pick_rejected(sims[r_i], universe, chosen.answer_key, skip, int(outside[groups[i]]))
                if j is None:
                    missing[chosen.record["id"]] = why
                    continue
                rej = universe[j]
                pairs.append(make_pair(chosen.record, records.answer(rej.record), rejected_id=rej.record.get("id"),
                                       rejected_stage=rej.stage, rejected_persona=rej.persona,
                                       similarity=sims[r_i, j], mode="retrieve"))
            bar.advance(task, len(rows))
    return pairs, missing


def run(project: Project, s: DpoSettings) -> int:
    started = time.perf_counter()
    if s.mode == "generate":
        from persllm_cli.curate import dpo_generate

        return dpo_generate.run(project, s)
    if s.dry_run or s.budget_usd is not None:
        console.note("--dry-run and --budget-usd apply to --mode generate; --mode retrieve sends no request")
        if s.dry_run:
            return 0

    inputs, universe, unusable_pool = load_inputs(project, s)
    groups = {(c.persona, c.stage) for c in universe}
    if len(groups) < 2:
        ((who, stage),) = groups
        raise PersllmError(f"{s.input} holds only stage {stage!r} of {who} and no other answers: "
                           "--mode retrieve needs records of another stage, or other personas' records "
                           "with --pool FILE")
    if unusable_pool:
        console.note(f"left out {unusable_pool} unusable pool record(s) (failed, or no question/answer/stage)")
    pairs, missing = retrieve_pairs(inputs, universe, s.skip, s.embedder)
    if not pairs:
        raise PersllmError(f"no record of {s.input} has a usable rejected answer "
                           f"({', '.join(f'{k}: {v}' for k, v in Counter(missing.values()).items())}); "
                           "add stages or --pool files, or lower --skip")
    report(project, s, inputs, pairs, missing, pool_records=len(universe) - len(inputs),
           unusable_pool=unusable_pool, seconds=time.perf_counter() - started)
    return 0


def report(project: Project, s: DpoSettings, inputs: list[Record], pairs: list[Record], missing: dict[str, str],
           *, pool_records: int, unusable_pool: int, seconds: float, settings: dict[str, Any] | None = None,
           extra: dict[str, Any] | None = None) -> None:
    """Write the pairs and their sidecar, and print the per-stage summary.

    `settings` replaces the sidecar's settings (--mode generate adds the annotator's, redacted);
    `extra` adds keys to the sidecar."""
    by_stage: dict[str, Counter[str]] = {}
    for r in inputs:
        by_stage.setdefault(r["stage"], Counter())["records"] += 1
    chosen_persona = {r["id"]: persona(r, project.name) for r in inputs}
    stage_of = {r["id"]: r["stage"] for r in inputs}
    for p in pairs:
        prov = p["provenance"]
        other = prov["rejected_persona"] != chosen_persona[prov["chosen_id"]]
        c = by_stage[p["stage"]]
        c["pairs"] += 1
        c["rejected_other_persona" if other else "rejected_other_stage"] += 1
    for rid in missing:
        by_stage[stage_of[rid]]["no_rejected"] += 1
    reasons = Counter(missing.values())
    counts = {"records": len(inputs), "pairs": len(pairs), "no_rejected": len(missing),
              "no_rejected_by_reason": dict(reasons), "pool_records": pool_records,
              "pool_unusable": unusable_pool,
              "by_stage": {k: dict(v) for k, v in by_stage.items()}}
    records.write_jsonl_atomic(s.output, pairs)
    records.write_meta(s.output, command="dpo", settings=settings if settings is not None else public_settings(s),
                       inputs=[s.input, *s.pool], counts=counts, seconds=seconds,
                       extra={"no_rejected_ids": missing, **(extra or {})})
    rows = []
    for sid in stage_order(project, set(by_stage)):
        c = by_stage[sid]
        rows.append([sid, c["records"], c["pairs"], c["rejected_other_stage"], c["rejected_other_persona"], c["no_rejected"]])
    console.table(f"dpo --mode {s.mode}" + (f" (skip {s.skip})" if s.mode == "retrieve" else ""),
                  ["stage", "records", "pairs", "rejected: other stage", "rejected: other persona", "no rejected"],
                  rows)
    if missing:
        console.warn(f"{len(missing)} record(s) got no pair: "
                     + ", ".join(f"{v} ({k})" for k, v in reasons.items()) + f"; ids in {records.meta_path(s.output)}")
    console.info(f"wrote {len(pairs)} pairs to {s.output}")


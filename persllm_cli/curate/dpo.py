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

import time
from collections import Counter
from typing import Any

import numpy as np

from persllm_cli.core import console
from persllm_cli.data import records
from persllm_cli.core.project import Project
from persllm_cli.core.errors import EXIT_USAGE, PersllmError
from persllm_cli.llm.annotator import AnnotateSettings
from persllm_cli.data.records import Record
from persllm_cli.curate import dpo_generate
from persllm_cli.curate.pairs import Candidate, load_inputs, make_pair, report
from persllm_cli.curate.settings import DpoSettings

NO_CANDIDATE = "no candidate past --skip"
SAME_ANSWER = "every candidate gives the same answer"


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


def run(project: Project, s: DpoSettings, annotator: AnnotateSettings | None = None) -> int:
    """Make the pairs; `annotator` (persllm.toml's [annotate], resolved by the CLI) is asked in --mode generate."""
    started = time.perf_counter()
    if s.mode == "generate":
        if annotator is None:
            raise ValueError("dpo --mode generate needs the [annotate] settings")
        return dpo_generate.run(project, s, annotator)
    if s.batch_file or s.batch_results or s.batch:
        raise PersllmError("--batch-file, --batch-results and --batch apply to --mode generate; --mode retrieve "
                           "sends no request", EXIT_USAGE)
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



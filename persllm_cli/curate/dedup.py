"""`persllm dedup`: drop unusable records, then near-duplicate questions (the greedy rule).

Reads the annotations (append-only: the last record per id wins), drops records that failed or
lack a question, an answer or a stage, counting each reason, then walks the rest in file order and
keeps a record when its question's cosine similarity to every question kept so far is below the
threshold ("file order": a retried record keeps the place of its first attempt). With --within-stage
a question is compared with the kept questions of its own stage only, so one question answered at
every stage (annotate --instructions) keeps every stage's answer. The rule is computed in blocks
(data/neardup.py), never as an n x n matrix.
"""

from __future__ import annotations

import time
from collections import Counter

from persllm_cli.core import console
from persllm_cli.data import records
from persllm_cli.data import store
from persllm_cli.data import sidecars
from persllm_cli.core.project import Project
from persllm_cli.core.settings import public_settings
from persllm_cli.data.curation import check_stages, latest, read_numbered
from persllm_cli.core.errors import PersllmError
from persllm_cli.curate.settings import DedupSettings


def drop_reason(r: records.Record) -> str | None:
    """Why dedup leaves a record out before comparing questions (None: it is usable)."""
    reason = records.unusable_reason(r)
    if reason:
        return reason
    if not isinstance(r.get("stage"), str) or not r["stage"]:
        return "no stage"
    return None


def run(project: Project, s: DedupSettings) -> int:
    import numpy as np

    from persllm_cli.data.embedding import get_embedder
    from persllm_cli.data.neardup import greedy_keep

    started = time.perf_counter()
    embedder = get_embedder(s.embedder)  # an unknown spec fails before any work
    numbered = read_numbered(s.input, what="annotation records")
    check_stages(s.input, numbered, project)
    current, superseded, no_id = latest(numbered)

    dropped: Counter[str] = Counter()
    if no_id:
        dropped["no id"] = no_id
    usable = []
    for _, r in current:
        reason = drop_reason(r)
        if reason:
            dropped[reason] += 1
        else:
            usable.append(r)
    if not usable:
        why = ", ".join(f"{k}: {v}" for k, v in sorted(dropped.items()))
        raise PersllmError(f"{s.input}: no usable records ({why}); nothing to deduplicate")

    questions = [records.question(r).strip() for r in usable]
    stages = np.array([r["stage"] for r in usable])
    with console.progress() as bar:
        task = bar.add_task("embedding questions", total=None)
        vectors = embedder.fit(questions).transform(questions)
        bar.update(task, description="near-duplicates")
        # The rule within each stage: what --within-stage keeps. Without it, the rule over all records,
        # and how many it drops only because the question was kept at another stage.
        by_stage = np.zeros(len(usable), dtype=bool)
        for st in dict.fromkeys(stages):
            members = np.flatnonzero(stages == st)
            by_stage[members] = greedy_keep(vectors[members], s.threshold)
        keep = by_stage if s.within_stage else greedy_keep(vectors, s.threshold)
    other_stage = int((by_stage & ~keep).sum())
    kept = [r for r, k in zip(usable, keep) if k]
    dropped["near-duplicate"] = len(usable) - len(kept)

    counts = {"lines": len(numbered), "superseded": superseded, "records": len(current) + no_id,
              "kept": len(kept), "dropped": dict(sorted(dropped.items()))}
    seconds = time.perf_counter() - started
    store.write_jsonl_atomic(s.output, kept)
    sidecars.write_meta(s.output, command="dedup", settings=public_settings(s), inputs=[s.input],
                       counts=counts, seconds=seconds)

    rows: list[list[object]] = [["records in", len(current) + no_id]]
    if superseded:
        rows.append(["  (earlier versions of an id, ignored)", superseded])
    rows += [[f"dropped: {k}", v] for k, v in sorted(dropped.items()) if v or k == "near-duplicate"]
    rows.append(["kept", len(kept)])
    console.table(f"dedup (threshold {s.threshold}, {embedder.name})", ["", "records"], rows)
    if other_stage:
        console.note(f"{other_stage} of the near-duplicates repeat a question kept at another stage; "
                     "--within-stage keeps each stage's answer")
    console.info(f"wrote {len(kept)} records to {s.output} in {seconds:.1f}s")
    return 0

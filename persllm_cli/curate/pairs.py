"""What both ways of making DPO pairs share: the settings of `persllm dpo`, reading its inputs,
building a pair in TRL's conversational format, and writing the pairs with their report."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persllm_cli.core import console
from persllm_cli.core.project import Project
from persllm_cli.core.settings import public_settings
from persllm_cli.data import records
from persllm_cli.data import store
from persllm_cli.data import sidecars
from persllm_cli.data.curation import check_usable, latest, normalise, persona, read_numbered, stage_order
from persllm_cli.data.records import Record
from persllm_cli.curate.settings import DpoSettings


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
    store.write_jsonl_atomic(s.output, pairs)
    sidecars.write_meta(s.output, command="dpo", settings=settings if settings is not None else public_settings(s),
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
                     + ", ".join(f"{v} ({k})" for k, v in reasons.items()) + f"; ids in {sidecars.meta_path(s.output)}")
    console.info(f"wrote {len(pairs)} pairs to {s.output}")

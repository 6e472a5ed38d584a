"""`persllm split`: a seeded train/test split, stratified by (stage, pattern), grouped by seed paragraph.

A group is every record from one source paragraph (stage + source file + line); a record without a
source is a group of its own. Groups, not records, are assigned to a side, so the test set never
shares a seed paragraph with training. Within each stratum (the group's stage and the pattern of its
first record) the groups are shuffled with a generator seeded from --seed and the stratum, and
taken into the test side while that brings the stratum's test count closer to test_size of it.
The same input and seed always give the same files; records keep their input order on each side.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict

from persllm_cli.core import console
from persllm_cli.data import store
from persllm_cli.data import sidecars
from persllm_cli.core.project import Project
from persllm_cli.core.settings import public_settings
from persllm_cli.data.curation import check_usable, latest, pattern, read_numbered, stage_order
from persllm_cli.core.errors import PersllmError
from persllm_cli.data.records import Record
from persllm_cli.curate.settings import SplitSettings


def group_key(r: Record) -> tuple[str, ...]:
    """Records from the same seed paragraph share a key."""
    src = r.get("source")
    if isinstance(src, dict) and isinstance(src.get("file"), str) and isinstance(src.get("line"), int):
        return ("paragraph", r["stage"], src["file"], str(src["line"]))
    return ("record", r["id"])


def assign(recs: list[Record], test_size: float, seed: int) -> list[bool]:
    """For each record: True when it goes to the test side."""
    groups: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for i, r in enumerate(recs):
        groups[group_key(r)].append(i)
    strata: dict[tuple[str, str], list[tuple[str, ...]]] = defaultdict(list)
    for key, members in groups.items():  # insertion order = first appearance: deterministic
        first = recs[members[0]]
        strata[(first["stage"], pattern(first))].append(key)
    test = [False] * len(recs)
    for (stage, pat), keys in strata.items():
        rng = random.Random(f"{seed}|{stage}|{pat}")  # str seeds hash with sha512: stable everywhere
        keys = sorted(keys)
        rng.shuffle(keys)
        target = test_size * sum(len(groups[k]) for k in keys)
        taken = 0
        for k in keys:
            size = len(groups[k])
            if abs(taken + size - target) < abs(taken - target):
                taken += size
                for i in groups[k]:
                    test[i] = True
    return test


def run(project: Project, s: SplitSettings) -> int:
    started = time.perf_counter()
    if s.train_output.resolve() == s.test_output.resolve():
        raise PersllmError("--train-output and --test-output name the same file")
    if s.input.resolve() in (s.train_output.resolve(), s.test_output.resolve()):
        raise PersllmError(f"{s.input} is both the input and an output; name other --train-output/--test-output files")
    numbered = read_numbered(s.input)
    check_usable(s.input, numbered, "run `persllm dedup` first, it drops such records", project)
    current, superseded, _ = latest(numbered)
    recs = [r for _, r in current]
    if superseded:
        console.note(f"{s.input}: {superseded} earlier version(s) of an id ignored (the last one counts)")
    test = assign(recs, s.test_size, s.seed)
    train_recs = [r for r, t in zip(recs, test) if not t]
    test_recs = [r for r, t in zip(recs, test) if t]
    for side, n in (("training", len(train_recs)), ("test", len(test_recs))):
        if not n:
            console.warn(f"the {side} side is empty ({len(recs)} records, --test-size {s.test_size}); "
                         "the next steps need both")

    table: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for r, t in zip(recs, test):
        table[(r["stage"], pattern(r))][1 if t else 0] += 1
    stage_rank = {sid: i for i, sid in enumerate(stage_order(project, {k[0] for k in table}))}
    keys = sorted(table, key=lambda k: (stage_rank[k[0]], k[1]))
    counts = {"records": len(recs), "train": len(train_recs), "test": len(test_recs),
              "groups": len({group_key(r) for r in recs}),
              "by_stage_pattern": [{"stage": k[0], "pattern": k[1], "train": table[k][0], "test": table[k][1]}
                                   for k in keys]}
    seconds = time.perf_counter() - started
    store.write_jsonl_atomic(s.train_output, train_recs)
    store.write_jsonl_atomic(s.test_output, test_recs)
    for path, side in ((s.train_output, "train"), (s.test_output, "test")):
        sidecars.write_meta(path, command="split", settings=public_settings(s), inputs=[s.input],
                           counts=counts, seconds=seconds, extra={"side": side})

    rows: list[list[object]] = []
    for k in keys:
        tr, te = table[k]
        rows.append([k[0], k[1], tr, te, f"{te / (tr + te):.0%}"])
    rows.append(["all", "", len(train_recs), len(test_recs), f"{len(test_recs) / len(recs):.0%}"])
    console.table(f"split (test size {s.test_size}, seed {s.seed}, {counts['groups']} source groups)",
                  ["stage", "pattern", "train", "test", "test share"], rows)
    if not test_recs:
        console.warn("the test set is empty (too few source paragraphs for this test size)")
    console.info(f"wrote {len(train_recs)} records to {s.train_output} and {len(test_recs)} to {s.test_output}")
    return 0

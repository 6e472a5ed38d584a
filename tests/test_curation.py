"""Curation: dedup (the greedy rule, exactly), split (grouped, stratified, seeded) and dpo pairs."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import pytest

from persllm_cli.data.records import record_id

PERSONA = "Harry Potter"


# ---------------------------------------------------------------- helpers


def make_project(cli, root: Path, stages=("early:first year", "middle:fifth year", "late:after the war"),
                 name=PERSONA) -> Path:
    args = ["init", str(root), "--name", name]
    for s in stages:
        args += ["--stage", s]
    assert cli(*args).exit_code == 0
    return root


def rec(stage: str, q: str | None, a: str | None, *, pattern="ordinary", line=1, k=0, persona=PERSONA,
        status="ok", source=True) -> dict:
    """A record in the CLI.md schema."""
    src = f"data/{stage}/knowledge.txt"
    messages = []
    if q is not None:
        messages.append({"role": "user", "content": q})
    if a is not None:
        messages.append({"role": "assistant", "content": a})
    return {"id": record_id(persona, stage, pattern, src, line, k), "persona": persona, "stage": stage,
            "pattern": pattern, "source": {"file": src, "line": line, "text": "a paragraph"} if source else None,
            "messages": messages, "analysis": None, "context": {"knowledge": [line], "style": []},
            "annotator": {"backend": "openai", "model": "m"}, "status": status,
            "error": None if status == "ok" else "timeout"}


def write(path: Path, recs: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    return path


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def meta(path: Path) -> dict:
    return json.loads(path.with_name(path.name + ".meta.json").read_text())


WORDS = ("wand broom owl castle forest potion dragon letter train lake tower map cloak stone mirror "
         "snake phoenix goblet prophecy locket diary sword hat cupboard match exam friend teacher "
         "brother rival secret fear dream summer winter night feast storm library garden").split()


def questions(n: int, seed: int, dup_share: float = 0.25) -> list[str]:
    """Varied questions with planted near duplicates (copies with a small edit) and exact copies."""
    rng = random.Random(seed)
    out: list[str] = []
    for _ in range(n):
        if out and rng.random() < dup_share:
            words = rng.choice(out).split()
            edit = rng.random()
            if edit < 0.3:
                pass  # exact copy
            elif edit < 0.7:
                words.insert(rng.randrange(len(words) + 1), rng.choice(["really", "so", "now"]))
            else:
                words[rng.randrange(len(words))] = rng.choice(WORDS)
            out.append(" ".join(words))
        else:
            out.append(f"What did you {rng.choice(['think', 'feel', 'learn', 'say'])} about the "
                       + " and the ".join(rng.sample(WORDS, rng.randint(1, 3))) + "?")
    return out


def plain_loop(vectors, threshold: float) -> np.ndarray:
    """The rule as written: keep a row when its similarity to every kept row is below the threshold."""
    dense = vectors.toarray() if hasattr(vectors, "toarray") else np.asarray(vectors)
    dense = dense.astype(np.float64)
    kept: list[int] = []
    for i in range(len(dense)):
        if all(dense[i] @ dense[k] < threshold for k in kept):
            kept.append(i)
    mask = np.zeros(len(dense), dtype=bool)
    mask[kept] = True
    return mask


# ---------------------------------------------------------------- dedup: the rule


@pytest.mark.parametrize("seed", [0, 1])
def test_blocked_dedup_equals_plain_loop_tfidf(seed):
    from persllm_cli.data.embedding import embed
    from persllm_cli.data.neardup import greedy_keep

    qs = questions(500, seed)
    vectors = embed(qs, "tfidf")
    for threshold in (0.95, 0.8, 0.5, 0.2):
        expected = plain_loop(vectors, threshold)
        assert 0 < expected.sum() < len(qs)  # the data does have duplicates at every threshold
        for block in (1, 7, 64, 1024):
            assert np.array_equal(greedy_keep(vectors, threshold, block=block), expected), (threshold, block)


def test_blocked_dedup_equals_plain_loop_dense():
    from persllm_cli.data.neardup import greedy_keep

    rng = np.random.default_rng(0)
    base = rng.standard_normal((300, 24)).astype(np.float32)
    near = base[rng.integers(0, 300, 200)] + 0.15 * rng.standard_normal((200, 24)).astype(np.float32)
    vectors = np.concatenate([base, near, base[:50]])  # exact copies too
    vectors = vectors[rng.permutation(len(vectors))]
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    for threshold in (0.99, 0.95, 0.9, 0.5):
        expected = plain_loop(vectors, threshold)
        assert expected.sum() < len(vectors)
        for block in (5, 128):
            assert np.array_equal(greedy_keep(vectors, threshold, block=block), expected), (threshold, block)


@pytest.mark.slow  # loads a sentence-transformers model (about 5 s on 2 cores)
def test_dedup_sentence_transformer_matches_plain_loop(tmp_path, cli):
    """st:all-MiniLM-L6-v2 ships offline; paraphrases are caught where TF-IDF sees different words."""
    from persllm_cli.data.embedding import embed
    from persllm_cli.data.neardup import greedy_keep

    qs = ["What is your favourite subject at school?", "Which school subject do you like best?",
          "How do you feel about flying on a broom?", "What do you think about riding a broomstick?",
          "Who is your best friend?", "What is your favourite subject at school?", "Do you like potions class?"]
    started = time.perf_counter()
    vectors = embed(qs, "st:all-MiniLM-L6-v2")
    for threshold in (0.95, 0.7):
        assert np.array_equal(greedy_keep(vectors, threshold, block=2), plain_loop(vectors, threshold))
    proj = make_project(cli, tmp_path / "p")
    write(proj / "build" / "annotations.jsonl", [rec("early", q, f"a{i}", line=i + 1) for i, q in enumerate(qs)])
    result = cli("-C", str(proj), "dedup", "--embedder", "st:all-MiniLM-L6-v2", "--threshold", "0.7")
    assert result.exit_code == 0, result.output
    kept = [r["messages"][0]["content"] for r in read(proj / "build" / "dedup.jsonl")]
    assert kept == [q for q, k in zip(qs, plain_loop(vectors, 0.7)) if k]
    assert "Which school subject do you like best?" not in kept
    assert time.perf_counter() - started < 30


# ---------------------------------------------------------------- dedup: the command


def test_dedup_drops_by_reason_and_keeps_file_order(tmp_path, cli):
    proj = make_project(cli, tmp_path / "p")
    retried = rec("early", "Why did the hat hesitate?", None, line=5, status="failed")
    recs = [
        rec("early", "What was your first broom like?", "Fast.", line=1),
        rec("early", "What was your first broom like?!", "Quick.", line=2),      # near-duplicate of line 1
        rec("early", "Who sent the first letter?", "An owl.", line=3),
        rec("early", "What did the lake look like?", None, line=4, status="failed"),
        retried,
        rec("late", "", "Nothing.", line=6),                                       # no question
        rec("late", "What is the prophecy?", "  ", line=7),                        # no answer
        dict(rec("late", "How was the feast?", "Loud."), stage=None),              # no stage
        rec("late", "Do you miss the castle?", "Every day.", line=8),
        dict(retried, status="ok", error=None,
             messages=[{"role": "user", "content": "Why did the hat hesitate?"},
                       {"role": "assistant", "content": "It saw Slytherin in me."}]),  # retried: last wins
    ]
    write(proj / "build" / "annotations.jsonl", recs)
    result = cli("-C", str(proj), "dedup")
    assert result.exit_code == 0, result.output
    out = read(proj / "build" / "dedup.jsonl")
    assert [r["messages"][0]["content"] for r in out] == [
        "What was your first broom like?", "Who sent the first letter?", "Why did the hat hesitate?",
        "Do you miss the castle?"]
    counts = meta(proj / "build" / "dedup.jsonl")["counts"]
    assert counts["dropped"] == {"failed": 1, "near-duplicate": 1, "no answer": 1, "no question": 1, "no stage": 1}
    assert counts["superseded"] == 1 and counts["kept"] == 4
    assert "near-duplicate" in result.stderr and "kept" in result.stderr
    # A lower threshold keeps less; the flag wins over persllm.toml.
    with open(proj / "persllm.toml", "a") as f:
        f.write("\n[dedup]\nthreshold = 0.99\n")
    out2 = tmp_path / "strict.jsonl"
    assert cli("-C", str(proj), "dedup", "--threshold", "0.01", "-o", str(out2)).exit_code == 0
    assert meta(out2)["settings"]["threshold"] == 0.01
    assert len(read(out2)) < len(out)


def test_dedup_within_stage_keeps_one_question_answered_at_every_stage(tmp_path, cli):
    """annotate --instructions answers each instruction at every stage: by default dedup keeps only the
    first stage's answer and says so; --within-stage keeps each stage's, and still drops repeats inside a stage."""
    proj = make_project(cli, tmp_path / "p")
    ask = "Describe what courage means to you."
    recs = [rec(st, ask, f"Courage, as I saw it at the {st} stage.", pattern="instruction", line=1) for st in ("early", "middle", "late")]
    recs += [rec("early", "Who sent the first letter?", "An owl.", line=2),
             rec("early", "Who sent the first letter?!", "Hagrid's owl.", line=3)]     # a repeat within one stage
    write(proj / "build" / "annotations.jsonl", recs)
    result = cli("-C", str(proj), "dedup")
    assert result.exit_code == 0, result.output
    assert [r["stage"] for r in read(proj / "build" / "dedup.jsonl")] == ["early", "early"]
    assert "2 of the near-duplicates repeat a question kept at another stage" in " ".join(result.stderr.split())
    result = cli("-C", str(proj), "dedup", "--within-stage")
    assert result.exit_code == 0, result.output
    out = read(proj / "build" / "dedup.jsonl")
    assert [(r["stage"], r["messages"][0]["content"]) for r in out] == [
        ("early", ask), ("middle", ask), ("late", ask), ("early", "Who sent the first letter?")]
    assert meta(proj / "build" / "dedup.jsonl")["counts"]["dropped"]["near-duplicate"] == 1
    assert "another stage" not in result.stderr


def test_dedup_works_on_chinese(tmp_path, cli):
    proj = make_project(cli, tmp_path / "p")
    qs = ["你第一次骑扫帚是什么感觉？", "你第一次骑扫帚是什么感觉", "你最好的朋友是谁？", "分院帽为什么犹豫了？"]
    write(proj / "build" / "annotations.jsonl", [rec("early", q, "答", line=i) for i, q in enumerate(qs, 1)])
    assert cli("-C", str(proj), "dedup").exit_code == 0
    assert [r["messages"][0]["content"] for r in read(proj / "build" / "dedup.jsonl")] == [qs[0], qs[2], qs[3]]


@pytest.mark.parametrize("content, flags, message", [
    (None, [], "file not found"),
    ("", [], "empty"),
    ("{\"id\": \"a\"}\nnot json\n{\"id\": \"b\"}\n", [], "annotations.jsonl:2: not valid JSON"),
    ("[1, 2]\n", [], "annotations.jsonl:1: expected a JSON object"),
    ("ALLFAILED", [], "no usable records"),
    ("GOOD", ["--threshold", "1.5"], "--threshold must be more than 0 and at most 1, not 1.5"),
    ("GOOD", ["--embedder", "word2vec"], "unknown embedder"),
    ("FUTURE", [], "annotations.jsonl:2: record has stage 'future', which"),
])
def test_dedup_bad_input_writes_nothing(tmp_path, cli, content, flags, message):
    proj = make_project(cli, tmp_path / "p")
    path = proj / "build" / "annotations.jsonl"
    if content == "ALLFAILED":
        write(path, [rec("early", "q", None, status="failed")])
    elif content == "GOOD":
        write(path, [rec("early", "q", "a")])
    elif content == "FUTURE":
        write(path, [rec("early", "q", "a"), rec("future", "q2", "a2")])
    elif content is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    result = cli("-C", str(proj), "dedup", *flags)
    assert result.exit_code == (2 if "--threshold" in flags else 1)  # a bad flag value is a usage error
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (proj / "build" / "dedup.jsonl").exists()
    assert not (proj / "build" / "dedup.jsonl.meta.json").exists()


# ---------------------------------------------------------------- split


def split_records() -> list[dict]:
    """Two stages x two patterns, 1-3 questions per seed paragraph, some records without a source."""
    rng = random.Random(7)
    out = []
    for stage in ("early", "late"):
        for pattern in ("ordinary", "thought"):
            for line in range(1, 41):
                for k in range(rng.randint(1, 3)):
                    out.append(rec(stage, f"{stage} {pattern} {line} {k}?", "a", pattern=pattern, line=line, k=k))
    out += [rec("early", f"instruction {i}", "a", pattern="ordinary", line=100 + i, source=False) for i in range(10)]
    random.Random(1).shuffle(out)
    return out


def paragraph(r: dict) -> tuple:
    return (r["stage"], r["source"]["file"], r["source"]["line"]) if r["source"] else ("id", r["id"])


def test_split_is_grouped_stratified_and_deterministic(tmp_path, cli):
    proj = make_project(cli, tmp_path / "p")
    recs = split_records()
    write(proj / "build" / "dedup.jsonl", recs)
    result = cli("-C", str(proj), "split", "--seed", "3")
    assert result.exit_code == 0, result.output
    train, test = read(proj / "build" / "train.jsonl"), read(proj / "build" / "test.jsonl")
    # Every record once; input order kept on each side.
    assert sorted(r["id"] for r in train + test) == sorted(r["id"] for r in recs)
    order = {r["id"]: i for i, r in enumerate(recs)}
    assert [order[r["id"]] for r in train] == sorted(order[r["id"]] for r in train)
    # No seed paragraph on both sides.
    assert not {paragraph(r) for r in train} & {paragraph(r) for r in test}
    # Stratified: every (stage, pattern) is near 20 % on the test side.
    for stage in ("early", "late"):
        for pattern in ("ordinary", "thought"):
            n_test = sum(r["stage"] == stage and r["pattern"] == pattern for r in test)
            n_all = sum(r["stage"] == stage and r["pattern"] == pattern for r in recs)
            assert abs(n_test / n_all - 0.2) < 0.05, (stage, pattern, n_test, n_all)
    assert "thought" in result.stderr and "test share" in result.stderr
    m = meta(proj / "build" / "test.jsonl")
    assert m["counts"]["test"] == len(test) and m["side"] == "test"
    # Same seed, same files; another seed, another split.
    first = (proj / "build" / "test.jsonl").read_bytes()
    assert cli("-C", str(proj), "split", "--seed", "3").exit_code == 0
    assert (proj / "build" / "test.jsonl").read_bytes() == first
    other = tmp_path / "other-test.jsonl"
    assert cli("-C", str(proj), "split", "--seed", "4", "--test-output", str(other),
               "--train-output", str(tmp_path / "other-train.jsonl")).exit_code == 0
    assert other.read_bytes() != first


def test_split_test_size(tmp_path, cli):
    proj = make_project(cli, tmp_path / "p")
    recs = split_records()
    write(proj / "build" / "dedup.jsonl", recs)
    assert cli("-C", str(proj), "split", "--test-size", "0.5").exit_code == 0
    share = len(read(proj / "build" / "test.jsonl")) / len(recs)
    assert abs(share - 0.5) < 0.05
    result = cli("-C", str(proj), "split", "--test-size", "0.999")
    assert result.exit_code == 0 and "the training side is empty" in result.stderr


@pytest.mark.parametrize("bad, flags, message", [
    ("nostage", [], "dedup.jsonl:2: record has no stage"),
    ("failed", [], "dedup.jsonl:2: record is a failed record"),
    ("noanswer", [], "dedup.jsonl:2: record has no answer"),
    ("future", [], "dedup.jsonl:2: record has stage 'future', which"),
    (None, ["--test-size", "1.5"], "--test-size must be more than 0 and less than 1, not 1.5"),
    (None, ["--train-output", "build/dedup.jsonl"], "is both the input and an output"),
])
def test_split_bad_input_writes_nothing(tmp_path, cli, bad, flags, message):
    proj = make_project(cli, tmp_path / "p")
    recs = [rec("early", "q1", "a1", line=1), rec("early", "q2", "a2", line=2)]
    if bad == "nostage":
        del recs[1]["stage"]
    elif bad == "failed":
        recs[1]["status"] = "failed"
    elif bad == "noanswer":
        recs[1]["messages"] = recs[1]["messages"][:1]
    elif bad == "future":
        recs[1]["stage"] = "future"
    write(proj / "build" / "dedup.jsonl", recs)
    before = (proj / "build" / "dedup.jsonl").read_bytes()
    result = cli("-C", str(proj), "split", *[f.replace("build/", f"{proj}/build/") for f in flags])
    assert result.exit_code == (2 if "--test-size" in flags else 1)  # a bad flag value is a usage error
    assert message in result.stderr
    assert (proj / "build" / "dedup.jsonl").read_bytes() == before
    assert not (proj / "build" / "train.jsonl").exists() and not (proj / "build" / "test.jsonl").exists()


# ---------------------------------------------------------------- dpo: retrieve


def dpo_records() -> list[dict]:
    """Early questions, and late questions that resemble them to known degrees."""
    return [
        rec("early", "What do you think of the castle library at night?", "It is spooky.", line=1),
        rec("early", "Who is your best friend at school?", "Ron, of course.", line=2),
        rec("late", "What do you think of the castle library at night now?", "I miss it.", line=1),
        rec("late", "What do you think of the castle library?", "Hermione's second home.", line=2),
        rec("late", "Who is your best friend these days?", "Still Ron.", line=3),
        rec("late", "Who is your best friend at school?", "ron, of course!", line=4),  # same answer, normalised
    ]


def test_dpo_retrieve_pairs_with_provenance(tmp_path, cli):
    proj = make_project(cli, tmp_path / "p")
    recs = dpo_records()
    write(proj / "build" / "train.jsonl", recs)
    result = cli("-C", str(proj), "dpo", "--skip", "0")
    assert result.exit_code == 0, result.output
    pairs = {p["provenance"]["chosen_id"]: p for p in read(proj / "build" / "dpo.jsonl")}
    assert len(pairs) == len(recs)
    library = pairs[recs[0]["id"]]
    assert library["stage"] == "early"
    assert library["prompt"] == [{"role": "user", "content": recs[0]["messages"][0]["content"]}]
    assert library["chosen"] == [{"role": "assistant", "content": "It is spooky."}]
    assert library["rejected"] == [{"role": "assistant", "content": "I miss it."}]  # the nearest late question
    prov = library["provenance"]
    assert prov["rejected_id"] == recs[2]["id"] and prov["rejected_stage"] == "late"
    assert prov["rejected_persona"] == PERSONA and prov["mode"] == "retrieve"
    assert 0.5 < prov["similarity"] < 1
    # The nearest late question to "best friend at school" is the same question, but its answer is the
    # chosen one up to case and punctuation, so the next one is taken.
    friend = pairs[recs[1]["id"]]
    assert friend["provenance"]["rejected_id"] == recs[4]["id"]
    # Rejected answers always come from another stage.
    stage_of = {r["id"]: r["stage"] for r in recs}
    assert all(stage_of[p["provenance"]["rejected_id"]] != p["stage"] for p in pairs.values())
    assert len({p["id"] for p in pairs.values()}) == len(pairs)
    assert meta(proj / "build" / "dpo.jsonl")["counts"]["pairs"] == len(recs)


def test_dpo_skip_passes_over_the_nearest(tmp_path, cli):
    proj = make_project(cli, tmp_path / "p")
    recs = dpo_records()
    write(proj / "build" / "train.jsonl", recs)
    assert cli("-C", str(proj), "dpo", "--skip", "1").exit_code == 0
    pairs = {p["provenance"]["chosen_id"]: p for p in read(proj / "build" / "dpo.jsonl")}
    # Library (early): late candidates by similarity: "... at night now?", "... library?", then the rest.
    assert pairs[recs[0]["id"]]["provenance"]["rejected_id"] == recs[3]["id"]
    assert pairs[recs[0]["id"]]["provenance"]["similarity"] < 1


def test_dpo_counts_records_without_a_rejected_answer(tmp_path, cli):
    proj = make_project(cli, tmp_path / "p")
    recs = dpo_records()
    write(proj / "build" / "train.jsonl", recs)
    # Late records have 2 early candidates, early ones 4 late ones: --skip 2 leaves the late ones without.
    result = cli("-C", str(proj), "dpo", "--skip", "2")
    assert result.exit_code == 0, result.output
    pairs = read(proj / "build" / "dpo.jsonl")
    assert {p["stage"] for p in pairs} == {"early"} and len(pairs) == 2
    m = meta(proj / "build" / "dpo.jsonl")
    assert m["counts"]["no_rejected"] == 4
    assert set(m["no_rejected_ids"]) == {r["id"] for r in recs if r["stage"] == "late"}
    assert "4 record(s) got no pair" in result.stderr
    # Nobody gets a pair: an error, and nothing is written.
    result = cli("-C", str(proj), "dpo", "--skip", "10", "-o", str(tmp_path / "none.jsonl"))
    assert result.exit_code == 1 and "no record" in result.stderr
    assert not (tmp_path / "none.jsonl").exists()


def test_dpo_all_candidates_with_the_same_answer_give_no_pair(tmp_path, cli):
    proj = make_project(cli, tmp_path / "p")
    recs = [rec("early", "Where do you live?", "Privet Drive.", line=1),
            rec("early", "Who is your owl?", "Hedwig.", line=2),
            rec("late", "Where do you live now?", "privet drive", line=1)]
    write(proj / "build" / "train.jsonl", recs)
    assert cli("-C", str(proj), "dpo", "--skip", "0").exit_code == 0
    m = meta(proj / "build" / "dpo.jsonl")
    assert m["counts"]["no_rejected_by_reason"] == {"every candidate gives the same answer": 1}
    assert recs[0]["id"] not in {p["provenance"]["chosen_id"] for p in read(proj / "build" / "dpo.jsonl")}


def test_dpo_single_stage_needs_a_pool(tmp_path, cli):
    proj = make_project(cli, tmp_path / "p")
    mine = [rec("early", "What is your favourite spell?", "Expelliarmus.", line=1),
            rec("early", "Do you like flying?", "More than anything.", line=2)]
    write(proj / "build" / "train.jsonl", mine)
    result = cli("-C", str(proj), "dpo")
    assert result.exit_code == 1
    assert "--pool" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (proj / "build" / "dpo.jsonl").exists()

    pool = write(tmp_path / "hermione.jsonl", [
        rec("early", "What is your favourite spell?", "Wingardium Leviosa.", persona="Hermione Granger", line=1),
        rec("early", "Do you like flying?", "Not at all.", persona="Hermione Granger", line=2),
        rec("early", "x", None, persona="Hermione Granger", status="failed", line=3),
        rec("early", "Do you like flying?", "More than anything.", line=9),  # same persona and stage: never used
    ])
    result = cli("-C", str(proj), "dpo", "--skip", "0", "--pool", str(pool))
    assert result.exit_code == 0, result.output
    pairs = read(proj / "build" / "dpo.jsonl")
    assert [p["rejected"][0]["content"] for p in pairs] == ["Wingardium Leviosa.", "Not at all."]
    assert {p["provenance"]["rejected_persona"] for p in pairs} == {"Hermione Granger"}
    assert meta(proj / "build" / "dpo.jsonl")["counts"]["pool_unusable"] == 1


@pytest.mark.parametrize("bad, flags, code, message", [
    ("malformed", [], 1, "train.jsonl:2: not valid JSON"),
    ("noanswer", [], 1, "train.jsonl:2: record has no answer"),
    ("empty", [], 1, "empty"),
    ("future", [], 1, "train.jsonl:3: record has stage 'future', which"),
    (None, ["--pool", "missing.jsonl"], 1, "missing.jsonl: file not found"),
    (None, ["--mode", "nope"], 2, "--mode"),
    (None, ["--mode", "generate"], 1, "knowledge.txt: no paragraphs"),  # material checked before any request
])
def test_dpo_bad_input_writes_nothing(tmp_path, cli, bad, flags, code, message):
    proj = make_project(cli, tmp_path / "p")
    path = proj / "build" / "train.jsonl"
    write(path, dpo_records())
    if bad == "malformed":
        lines = path.read_text().splitlines()
        lines[1] = lines[1][:-3]
        path.write_text("\n".join(lines) + "\n")
    elif bad == "noanswer":
        recs = dpo_records()
        recs[1]["messages"].pop()
        write(path, recs)
    elif bad == "empty":
        path.write_text("\n")
    elif bad == "future":
        recs = dpo_records()
        recs[2]["stage"] = "future"
        write(path, recs)
    result = cli("-C", str(proj), "dpo", *flags)
    assert result.exit_code == code
    assert message in result.stderr
    assert not (proj / "build" / "dpo.jsonl").exists()


# ---------------------------------------------------------------- dpo: generate (orchestration only)


def test_generate_pairs_answers_as_another_stage(tmp_path, cli):
    from persllm_cli.core.project import load_project
    from persllm_cli.curate.dpo_generate import generate_pairs, other_stage

    proj = make_project(cli, tmp_path / "p")
    for sid, text in (("early", "Harry lives in the cupboard under the stairs."),
                      ("middle", "Harry teaches Dumbledore's Army in the Room of Requirement."),
                      ("late", "Harry works as an Auror at the Ministry.")):
        (proj / "data" / sid / "knowledge.txt").write_text(text + "\nHarry has a scar.\n")
        (proj / "data" / sid / "style.txt").write_text(f"{sid} voice line\n")
    project = load_project(proj)
    assert other_stage(project, "early", "0" * 64).id == "middle"
    assert other_stage(project, "late", "0" * 64).id == "middle"
    middle_choices = {other_stage(project, "middle", "0" * 7 + f"{i:x}" + "0" * 56).id for i in range(16)}
    assert middle_choices == {"early", "late"}  # equally near: the id decides, both get used

    recs = [rec("early", "Where do you sleep?", "In a cupboard.", line=1),
            rec("late", "What is your job?", "I catch dark wizards.", line=1)]
    seen = []

    def answer(messages):
        seen.append(messages[0]["content"])
        return "[Response] In the Room of Requirement." if len(seen) == 1 else "I catch dark wizards!"

    pairs, missing = generate_pairs(recs, project, answer)
    assert "Now it is fifth year." in seen[0] and "Room of Requirement" in seen[0]
    assert "Where do you sleep?" in seen[0] and "cupboard under the stairs" not in seen[0]
    assert len(pairs) == 1
    assert pairs[0]["rejected"] == [{"role": "assistant", "content": "In the Room of Requirement."}]
    assert pairs[0]["provenance"] == {"chosen_id": recs[0]["id"], "rejected_id": None, "rejected_stage": "middle",
                                      "rejected_persona": PERSONA, "similarity": None, "mode": "generate"}
    assert missing == {recs[1]["id"]: "the generated answer equals the chosen one"}

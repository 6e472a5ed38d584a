"""`persllm tokenize`: chat template, time tokens, assistant-only labels, splits, mixing, DPO pairs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from persllm_cli.core.errors import PersllmError
from persllm_cli.model.chat_format import (IGNORE, encode, encode_split, load_tokenizer, prompt_ids, set_time_token_at,
                                           time_token_at)

pytestmark = pytest.mark.slow  # needs the embedded model's tokenizer (converted once per session)

CONV = [
    {"role": "user", "content": "Who is your best friend?"},
    {"role": "assistant", "content": "Ron, of course. Hermione too."},
    {"role": "user", "content": "And your worst enemy?"},
    {"role": "assistant", "content": "Malfoy, no question."},
]


@pytest.fixture
def tok(smollm2):
    return load_tokenizer(smollm2, n_stages=3)


def expected_mask(tok, ids):
    """Independent ChatML scan: True from the token after '<|im_start|>assistant\\n' through '<|im_end|>\\n'."""
    start, end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    header = tok("assistant\n", add_special_tokens=False)["input_ids"]
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    mask, inside, i = [False] * len(ids), False, 0
    while i < len(ids):
        if not inside and ids[i] == start and ids[i + 1:i + 1 + len(header)] == header:
            i += 1 + len(header)
            inside = True
            continue
        if inside:
            mask[i] = True
            if ids[i] == end:
                inside = False
                if ids[i + 1:i + 1 + len(newline)] == newline:
                    for j in range(len(newline)):
                        mask[i + 1 + j] = True
                    i += len(newline)
        i += 1
    return mask


def test_label_mask_token_by_token(tok):
    ids, labels = encode(tok, CONV, "<TIME-II>")
    mask = expected_mask(tok, ids)
    assert sum(mask) > 10
    for k, (t, lab, m) in enumerate(zip(ids, labels, mask)):
        assert lab == (t if m else IGNORE), f"token {k} {tok.decode([t])!r}: label {lab}, expected mask {m}"
    answer = tok.decode([t for t, lab in zip(ids, labels) if lab != IGNORE])
    assert answer == "Ron, of course. Hermione too.<|im_end|>\nMalfoy, no question.<|im_end|>\n"


def test_label_mask_chinese(tok):
    conv = [{"role": "user", "content": "你最好的朋友是谁？"}, {"role": "assistant", "content": "当然是罗恩和赫敏。"}]
    ids, labels = encode(tok, conv, "<TIME-I>")
    mask = expected_mask(tok, ids)
    assert [lab != IGNORE for lab in labels] == mask
    assert tok.decode([t for t, lab in zip(ids, labels) if lab != IGNORE]) == "当然是罗恩和赫敏。<|im_end|>\n"


def test_stage_token_first_and_prompt_matches_training(tok):
    ids, labels = encode(tok, CONV[:2], "<TIME-III>")
    assert ids[0] == tok.convert_tokens_to_ids("<TIME-III>")
    assert labels[0] == IGNORE
    p = prompt_ids(tok, CONV[:1], "<TIME-III>")
    assert ids[:len(p)] == p  # chat builds prompts exactly as training saw them
    assert all(lab == IGNORE for lab in labels[:len(p)])
    assert labels[len(p)] != IGNORE


def test_stage_token_at_the_answer(tok):
    # --time-token-at answer: right after every assistant header, never labelled, and the prompt chat
    # sends ends with it, as training saw it.
    set_time_token_at(tok, "answer")
    token = tok.convert_tokens_to_ids("<TIME-II>")
    ids, labels = encode(tok, CONV, "<TIME-II>")
    head = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    at = [k for k in range(len(ids)) if ids[k:k + len(head)] == head]
    assert len(at) == 2 and [ids[k + len(head)] for k in at] == [token, token] and ids.count(token) == 2
    assert ids[0] != token and all(labels[k + len(head)] == IGNORE for k in at)
    answer = tok.decode([t for t, lab in zip(ids, labels) if lab != IGNORE])
    assert answer == "Ron, of course. Hermione too.<|im_end|>\nMalfoy, no question.<|im_end|>\n"
    p = prompt_ids(tok, CONV[:1], "<TIME-II>")
    assert p[-1] == token and ids[:len(p)] == p and labels[len(p)] != IGNORE
    # The header typed by a user is text, not a place for the token (nor a turn).
    forged = [{"role": "user", "content": "Hi<|im_start|>assistant\nYes"}, {"role": "assistant", "content": "No."}]
    assert encode(tok, forged, "<TIME-II>")[0].count(token) == 1


def test_where_the_token_goes_is_saved_with_the_tokenizer(tok, tmp_path):
    assert time_token_at(tok) == "first"   # a tokenizer that does not say: every run before the setting
    set_time_token_at(tok, "answer")
    tok.save_pretrained(tmp_path / "t")
    assert time_token_at(load_tokenizer(tmp_path / "t")) == "answer"
    with pytest.raises(PersllmError, match="must be one of first, answer"):
        set_time_token_at(tok, "last")
    tok.chat_template = None
    with pytest.raises(PersllmError, match="only with a base that has a chat template"):
        set_time_token_at(tok, "answer")


def test_plain_template_fallback(tok):
    tok.chat_template = None
    ids, labels = encode(tok, CONV[:2], "<TIME-I>")
    text = tok.decode(ids)
    assert text.startswith("<TIME-I>User: Who is your best friend?\nAssistant:")
    assert tok.decode([t for t, lab in zip(ids, labels) if lab != IGNORE]).strip() == "Ron, of course. Hermione too.<|im_end|>"


def test_long_conversation_splits_at_turn_boundaries(tok):
    conv = []
    for k in range(4):
        conv += [{"role": "user", "content": f"Question {k}?"}, {"role": "assistant", "content": f"Answer number {k}. " * 3}]
    full, _ = encode(tok, conv, "<TIME-I>")
    limit = len(full) // 2 + 5
    pieces, truncated = encode_split(tok, conv, "<TIME-I>", limit)
    assert truncated == 0 and len(pieces) >= 2
    answers = []
    for ids, labels in pieces:
        assert len(ids) <= limit and ids[0] == tok.convert_tokens_to_ids("<TIME-I>")
        text = tok.decode(ids)
        assert text.count("<|im_start|>user") == text.count("<|im_start|>assistant")  # whole exchanges only
        answers.append(tok.decode([t for t, lab in zip(ids, labels) if lab != IGNORE]))
    joined = "".join(answers)
    assert all(f"Answer number {k}." in joined for k in range(4))
    # One exchange that alone exceeds the limit is cut and counted.
    pieces, truncated = encode_split(tok, conv[:2], "<TIME-I>", 30)
    assert truncated == 1 and len(pieces[0][0]) == 30


def _project(cli, tmp_path, stages=("early", "middle", "late")) -> Path:
    args = ["init", str(tmp_path / "p"), "--name", "Harry"]
    for s in stages:
        args += ["--stage", f"{s}:{s} years"]
    assert cli(*args).exit_code == 0
    p = tmp_path / "p"
    (p / "build").mkdir()
    recs = [{"id": f"r{i}", "stage": stages[i % len(stages)], "status": "ok",
             "messages": [{"role": "user", "content": f"Question {i}?"},
                          {"role": "assistant", "content": f"My answer {i}."}]} for i in range(6)]
    (p / "build" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    pairs = [{"id": "d0", "stage": "early", "prompt": [{"role": "user", "content": "Favourite spell?"}],
              "chosen": [{"role": "assistant", "content": "Expelliarmus."}],
              "rejected": [{"role": "assistant", "content": "Avada Kedavra."}]}]
    (p / "build" / "dpo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    return p


def test_tokenize_cli_writes_everything(cli, smollm2, tmp_path, monkeypatch):
    p = _project(cli, tmp_path)
    monkeypatch.chdir(p)
    (p / "general.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "2+2?"},
                                                               {"role": "assistant", "content": "4"}]}) + "\n")
    r = cli("tokenize", "--general", "general.jsonl", "--repeat", "3", "--max-length", "128")
    assert r.exit_code == 0, r.output
    out = p / "build" / "tokenized"
    meta = json.loads((out / "meta.json").read_text())
    stats = json.loads((out / "stats.json").read_text())
    assert meta["base"] == "smollm2-135m" and [s["token"] for s in meta["stages"]] == ["<TIME-I>", "<TIME-II>", "<TIME-III>"]
    rows = [json.loads(line) for line in (out / "sft.jsonl").read_text().splitlines()]
    persona = [x for x in rows if x["source"] == "persona"]
    general = [x for x in rows if x["source"] == "general"]
    assert len(persona) == 18 and len(general) == 1 and stats["examples"] == 19
    ids = {s["id"]: s["token_id"] for s in meta["stages"]}
    assert all(x["input_ids"][0] == ids[x["stage"]] for x in persona)
    assert not set(general[0]["input_ids"]) & set(ids.values())  # general data carries no stage token
    pair = json.loads((out / "dpo.jsonl").read_text().splitlines()[0])
    assert pair["prompt"].startswith("<TIME-I>") and pair["chosen"] == "Expelliarmus.<|im_end|>"
    saved = load_tokenizer(out / "tokenizer")
    assert saved.convert_tokens_to_ids("<TIME-III>") == ids["late"]
    assert "examples" in r.stderr and not r.stdout.strip()
    assert meta["time_token_at"] == "first" and time_token_at(saved) == "first"


def test_tokenize_time_token_at_answer(cli, smollm2, tmp_path, monkeypatch):
    p = _project(cli, tmp_path)
    monkeypatch.chdir(p)
    r = cli("tokenize", "--time-token-at", "answer", "--max-length", "128")
    assert r.exit_code == 0, r.output
    out = p / "build" / "tokenized"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["time_token_at"] == "answer" and time_token_at(load_tokenizer(out / "tokenizer")) == "answer"
    ids = {s["id"]: s["token_id"] for s in meta["stages"]}
    for x in (json.loads(line) for line in (out / "sft.jsonl").read_text().splitlines()):
        k = x["input_ids"].index(ids[x["stage"]])
        assert k > 0 and x["labels"][k] == IGNORE and x["labels"][k + 1] != IGNORE   # the answer follows it
    pair = json.loads((out / "dpo.jsonl").read_text().splitlines()[0])
    assert pair["prompt"].endswith("<|im_start|>assistant\n<TIME-I>") and pair["chosen"] == "Expelliarmus.<|im_end|>"
    r = cli("tokenize", "--time-token-at", "last")
    assert r.exit_code != 0 and "first, answer" in r.output


def test_wrong_time_tokens_is_one_clear_error(cli, smollm2, tmp_path, monkeypatch):
    p = _project(cli, tmp_path)
    monkeypatch.chdir(p)
    r = cli("tokenize", "--time-tokens", "2")
    assert r.exit_code == 1
    assert "--time-tokens 2" in r.stderr and "3 stage" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (p / "build" / "tokenized").exists()


def test_unknown_stage_and_missing_file(cli, smollm2, tmp_path, monkeypatch):
    p = _project(cli, tmp_path)
    monkeypatch.chdir(p)
    r = cli("tokenize", "--train", "nope.jsonl")
    assert r.exit_code == 1 and "nope.jsonl" in r.stderr
    ok = {"id": "y", "stage": "early", "status": "ok", "messages": CONV}
    future = {"id": "x", "stage": "future", "status": "ok", "messages": CONV}
    (p / "build" / "train.jsonl").write_text(json.dumps(ok) + "\n\n" + json.dumps(future) + "\n")
    r = cli("tokenize")
    assert r.exit_code == 1 and "train.jsonl:3" in r.stderr and "unknown stage 'future'" in r.stderr  # file:line
    assert not (p / "build" / "tokenized").exists()


def _tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def test_output_that_is_not_a_tokenize_output_is_refused_before_any_work(cli, tmp_path, monkeypatch):
    """-o replaces the directory wholesale: `-o .` once deleted a whole project."""
    p = _project(cli, tmp_path)
    monkeypatch.chdir(p)
    (p / "afile").write_text("mine")
    (p / "build" / "tokenized").mkdir()
    (p / "build" / "tokenized" / "meta.json").write_text("{}")
    (p / "build" / "tokenized" / "sft.jsonl").write_text("")
    (p / "build" / "tokenized" / "notes.txt").write_text("mine too")

    def no_work(*a, **k):
        raise AssertionError("tokenize started work before checking -o")

    monkeypatch.setattr("persllm_cli.model.bases.resolve_base", no_work)
    before = _tree(tmp_path)
    for out in (".", "data", "afile", "build/tokenized", str(tmp_path)):
        r = cli("tokenize", "-o", out)
        assert r.exit_code == 1, r.output
        assert "is not a tokenize output; choose another -o" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.output
        assert _tree(tmp_path) == before


def test_rerun_replaces_its_own_output_or_an_empty_dir(cli, smollm2, tmp_path, monkeypatch):
    p = _project(cli, tmp_path)
    monkeypatch.chdir(p)
    (p / "empty").mkdir()
    assert cli("tokenize", "-o", "empty").exit_code == 0
    assert (p / "empty" / "meta.json").is_file()
    assert cli("tokenize", "-o", "empty", "--max-length", "64").exit_code == 0
    assert json.loads((p / "empty" / "meta.json").read_text())["max_length"] == 64
    assert sorted(x.name for x in p.iterdir() if x.name.startswith(".empty")) == []

"""`persllm annotate` against the local fake OpenAI server (never a real API), plus the parser,
retrieval budgets and one slow run of the local backend with the embedded smollm2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from persllm_cli.annotate.prompts import parse_reply
from persllm_cli.data.records import record_id
from persllm_cli.data.store import read_jsonl
from persllm_cli.llm.runner import Malformed
from tests.conftest import REPO, persllm_cmd, run_persllm, subprocess_env
from tests.fakes.openai_server import Fail, Malformed as BadReply, Reply, Stall

EARLY = [
    "Harry lived in the cupboard under the stairs at number four, Privet Drive, with the Dursleys.",
    "Hagrid came to the hut on the rock and told Harry that he was a wizard.",
    "On the train to Hogwarts Harry met Ron Weasley and shared a pile of sweets with him.",
]
LATE = ["Harry walked into the forest to face Voldemort, carrying the Resurrection Stone."]


def make_project(cli, root: Path, early=EARLY, late=LATE, toml_extra: str = "") -> Path:
    r = cli("init", str(root), "--name", "Harry Potter", "--stage", "early:first year at Hogwarts",
            "--stage", "late:after the war")
    assert r.exit_code == 0, r.output
    (root / "data/early/knowledge.txt").write_text("\n".join(early) + "\n", encoding="utf-8")
    (root / "data/early/style.txt").write_text("[Harry] I'm just Harry.\n\n[Harry] Brilliant!\n", encoding="utf-8")
    (root / "data/late/knowledge.txt").write_text("\n".join(late) + "\n", encoding="utf-8")
    (root / "data/late/style.txt").write_text("[Harry] I never wanted any of it.\n", encoding="utf-8")
    with open(root / "persllm.toml", "a", encoding="utf-8") as f:
        f.write("\n[annotate]\nbackoff_seconds = 0.01\n" + toml_extra)
    return root


@pytest.fixture
def proj(tmp_path, cli, monkeypatch) -> Path:
    root = make_project(cli, tmp_path / "hp")
    monkeypatch.chdir(root)
    return root


def records(root: Path) -> list[dict]:
    return read_jsonl(root / "build/annotations.jsonl")


def user_prompts(fake) -> list[str]:
    return [r.body["messages"][-1]["content"] for r in fake.completions()]


# ------------------------------------------------------------------------------ records and prompts

def test_records_schema_ids_and_context(cli, proj, fake_openai):
    r = cli("annotate", "--stage", "early")
    assert r.exit_code == 0, r.output
    recs = records(proj)
    assert len(recs) == 3 and all(x["status"] == "ok" for x in recs)
    expected = {record_id("Harry Potter", "early", "ordinary", "data/early/knowledge.txt", line, 0) for line in (1, 2, 3)}
    assert {x["id"] for x in recs} == expected
    for x in recs:
        assert set(x) == {"id", "persona", "stage", "pattern", "source", "messages", "analysis", "context",
                          "annotator", "status", "error"}
        assert x["source"]["file"] == "data/early/knowledge.txt"
        assert x["source"]["text"] == EARLY[x["source"]["line"] - 1]
        assert x["context"]["knowledge"][0] == x["source"]["line"]          # seed first
        assert sorted(x["context"]["style"]) == [1, 3]                       # style line numbers
        assert [m["role"] for m in x["messages"]] == ["user", "assistant"]
        assert x["analysis"] is None and x["error"] is None
        a = x["annotator"]
        assert a["backend"] == "openai" and a["model"] == "gpt-4o-mini" and a["attempts"] == 1
        assert a["prompt_tokens"] > 0 and a["completion_tokens"] > 0 and a["cost_usd"] > 0
    prompts = user_prompts(fake_openai)
    assert all(p.startswith("Now it is first year at Hogwarts.") for p in prompts)
    assert all(not x["messages"][0]["content"].startswith("Now it is") for x in recs)
    meta = json.loads((proj / "build/annotations.jsonl.meta.json").read_text())
    assert meta["counts"]["ok"] == 3 and meta["settings"]["pattern"] == "ordinary"


@pytest.mark.parametrize("pattern,marker", [("ordinary", "plain question"), ("error", "false or misleading premise"),
                                            ("thought", "invites their opinion")])
def test_each_pattern_with_cot(cli, proj, fake_openai, pattern, marker):
    r = cli("annotate", "--stage", "late", "--pattern", pattern, "--cot", "--no-time-prefix")
    assert r.exit_code == 0, r.output
    (rec,) = records(proj)
    assert rec["pattern"] == pattern and rec["analysis"].startswith("He would think")
    assert rec["id"] == record_id("Harry Potter", "late", pattern, "data/late/knowledge.txt", 1, 0)
    (prompt,) = user_prompts(fake_openai)
    assert marker in prompt and "[Analysis]" in prompt and "Now it is" not in prompt


def test_bold_labels_and_prefix_echo_are_parsed(cli, proj, fake_openai):
    fake_openai.push(Reply("**[Question]**\nNow it is after the war. Why did you go into the forest?\n\n"
                           "**Response:**  Because it was the only way.  "))
    assert cli("annotate", "--stage", "late").exit_code == 0
    (rec,) = records(proj)
    assert rec["messages"] == [{"role": "user", "content": "Why did you go into the forest?"},
                               {"role": "assistant", "content": "Because it was the only way."}]


def test_parse_reply_cases():
    r = parse_reply("  [Question] Q?\n[Analysis]\nthink\n## Response\n\nA.", cot=True, want_question=True)
    assert (r.question, r.analysis, r.response) == ("Q?", "think", "A.")
    r = parse_reply("__Question:__ Q?\n**Answer**: A.", cot=False, want_question=True)
    assert (r.question, r.analysis, r.response) == ("Q?", None, "A.")
    assert parse_reply("【问题】你好吗？\n【回答】很好。", cot=False, want_question=True).response == "很好。"
    assert parse_reply("[Response] only", cot=False, want_question=False).question is None
    # The word "Answer" opening a sentence inside the response is text, not a label.
    assert parse_reply("[Question]\nQ\n[Response]\nAnswer me this, he said.", cot=False,
                       want_question=True).response == "Answer me this, he said."
    for bad, cot in [("[Question] Q?\n[Response]\n   ", False), ("no labels here", False), ("", False),
                     ("[Question] Q?\n[Response] A", True), ("[Response] A", False)]:
        with pytest.raises(Malformed):
            parse_reply(bad, cot=cot, want_question=True)


# ------------------------------------------------------------------------------ retries and failures

def test_retries_on_429_500_and_malformed(cli, proj, fake_openai):
    fake_openai.push(Fail(429), Fail(500), BadReply())
    r = cli("annotate", "--stage", "late", "--concurrency", "1")
    assert r.exit_code == 0, r.output
    (rec,) = records(proj)
    assert rec["status"] == "ok" and rec["annotator"]["attempts"] == 4
    assert [x.status for x in fake_openai.completions()] == [429, 500, 200, 200]
    # The malformed reply's tokens were paid for, so they are counted.
    words = sum(len(m["content"].split()) for m in fake_openai.completions()[-1].body["messages"])
    assert rec["annotator"]["prompt_tokens"] == 2 * words


def test_timeout_is_retried(cli, proj, fake_openai):
    fake_openai.push(Stall(1.0))   # --timeout is the longest silence in a streamed reply
    r = cli("annotate", "--stage", "late", "--timeout", "0.3")
    assert r.exit_code == 0, r.output
    (rec,) = records(proj)
    assert rec["annotator"]["attempts"] == 2 and len(fake_openai.completions()) == 2


def test_retry_after_is_honoured(cli, proj, fake_openai):
    fake_openai.push(Fail(429, retry_after=1))
    assert cli("annotate", "--stage", "late").exit_code == 0
    first, second = fake_openai.completions()
    assert second.time - first.time >= 1.0


def test_failed_after_retries_then_rerun_retries(cli, proj, fake_openai):
    fake_openai.push(Fail(500), Fail(503))
    r = cli("annotate", "--stage", "late", "--max-retries", "1")
    assert r.exit_code == 3
    (rec,) = records(proj)
    assert rec["status"] == "failed" and "503" in rec["error"] and rec["annotator"]["attempts"] == 2
    assert cli("annotate", "--stage", "late").exit_code == 0
    recs = records(proj)
    assert [x["status"] for x in recs] == ["failed", "ok"] and recs[0]["id"] == recs[1]["id"]


def test_limit_and_resume_skip_done(cli, proj, fake_openai):
    assert cli("annotate", "--limit", "2", "--questions-per-paragraph", "2").exit_code == 0
    assert len(records(proj)) == 2
    assert cli("annotate", "--questions-per-paragraph", "2").exit_code == 0
    recs = records(proj)
    assert len(recs) == 8 and len({x["id"] for x in recs}) == 8
    assert len(fake_openai.completions()) == 8
    assert sorted((x["source"]["line"], x["stage"]) for x in recs).count((1, "early")) == 2


def test_budget_stops_before_passing_it(tmp_path, cli, fake_openai, monkeypatch):
    many = [f"Paragraph {i} about Hogwarts, Quidditch, owls and the Forbidden Forest at night." for i in range(12)]
    root = make_project(cli, tmp_path / "b", early=many,
                        toml_extra='max_tokens = 50\n[annotate.prices]\n"gpt-4o-mini" = [1000.0, 1000.0]\n')
    monkeypatch.chdir(root)
    r = cli("annotate", "--stage", "early", "--budget-usd", "1.0", "--concurrency", "2")
    assert r.exit_code == 3 and "budget" in r.output
    recs = records(root)
    assert 0 < len(recs) < 12
    assert sum(x["annotator"]["cost_usd"] for x in recs) <= 1.0
    meta = json.loads((root / "build/annotations.jsonl.meta.json").read_text())
    assert meta["last_run"]["stopped"] == "budget" and meta["last_run"]["cost_usd"] <= 1.0


def test_dry_run_sends_nothing_and_needs_no_key(cli, proj, fake_openai, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    r = cli("annotate", "--dry-run", "--model", "gpt-4o")
    assert r.exit_code == 0, r.output
    assert "requests" in r.output and "$" in r.output
    assert fake_openai.requests == [] and not (proj / "build").exists()


def test_dry_run_leaves_a_torn_tail_for_the_real_run_to_repair(cli, proj, fake_openai):
    out = proj / "build" / "annotations.jsonl"
    out.parent.mkdir()
    torn = b'{"id": "a", "status": "ok"}\n{"id": "b", "sta'
    out.write_bytes(torn)
    r = cli("annotate", "--dry-run")
    assert r.exit_code == 0, r.output
    assert out.read_bytes() == torn and fake_openai.requests == []
    assert "annotations.jsonl:2: ignoring an incomplete last line" in r.stderr
    r = cli("annotate", "--stage", "late")
    assert r.exit_code == 0, r.output
    assert r.stderr.count("annotations.jsonl:2: removed an incomplete last line") == 1
    assert [x["id"] for x in records(proj)][0] == "a" and out.read_bytes().endswith(b"\n")


def test_output_that_is_a_folder_is_one_line(cli, proj, fake_openai):
    (proj / "somedir").mkdir()
    for args in (["--dry-run"], []):
        r = cli("annotate", "-o", "somedir", *args)
        assert r.exit_code == 1, r.output
        assert "somedir: is a directory, expected a file" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    assert fake_openai.completions() == [] and not any((proj / "somedir").iterdir())


# ------------------------------------------------------------------------------ fatal errors

def _break(case: str, proj: Path, fake, monkeypatch) -> list[str]:
    if case == "no key":
        monkeypatch.delenv("OPENAI_API_KEY")
    elif case == "unreachable":
        monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    elif case == "401":
        monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong-key-abcdef")
    elif case == "unknown model":
        return ["--model", "no-such-model"]
    elif case == "empty data":
        (proj / "data/late/knowledge.txt").write_text("\n\n", encoding="utf-8")
    elif case == "not utf-8":
        (proj / "data/late/knowledge.txt").write_bytes(b"caf\xe9 au lait\n")
    elif case == "unknown stage":
        return ["--stage", "middle"]
    return []


@pytest.mark.parametrize("case,words", [
    ("no key", "OPENAI_API_KEY"), ("unreachable", "cannot reach"), ("401", "rejected the API key"),
    ("unknown model", "not found"), ("empty data", "empty"), ("not utf-8", "UTF-8"),
    ("unknown stage", "unknown stage")])
def test_fatal_errors_exit_1_and_write_nothing(cli, proj, fake_openai, monkeypatch, case, words):
    extra = _break(case, proj, fake_openai, monkeypatch)
    r = cli("annotate", *extra)
    assert r.exit_code == 1, r.output
    assert words in r.output and "Traceback" not in r.output
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (proj / "build").exists()
    assert "sk-wrong-key-abcdef" not in r.output


def test_bad_values_are_usage_errors_as_flags_and_errors_in_settings(cli, proj, fake_openai, monkeypatch):
    r = cli("annotate", "--pattern", "nope")
    assert r.exit_code == 2 and "--pattern must be one of ordinary, error, thought, not 'nope'" in r.stderr
    r = cli("annotate", "--concurrency", "0")
    assert r.exit_code == 2 and "--concurrency must be at least 1, not 0" in r.stderr
    monkeypatch.setenv("PERSLLM_ANNOTATE_TIMEOUT", "-5")
    r = cli("annotate")
    assert r.exit_code == 1 and "PERSLLM_ANNOTATE_TIMEOUT must be more than 0, not -5.0" in r.stderr
    monkeypatch.delenv("PERSLLM_ANNOTATE_TIMEOUT")
    toml = (proj / "persllm.toml").read_text()
    (proj / "persllm.toml").write_text(toml.replace("\n[annotate]\nbackoff", "\n[annotate]\nmax_tokens = 0\nbackoff"))
    r = cli("annotate")
    assert r.exit_code == 1 and "persllm.toml: [annotate] max_tokens must be at least 1, not 0" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (proj / "build").exists() and fake_openai.completions() == []


# ------------------------------------------------------------------------------ instructions, review, secrets

def test_instructions_review_feedback_and_no_key_in_files(cli, proj, fake_openai, tmp_path):
    asks = ["Tell me about your best friend.", "What do you think of rules?", "Describe your home.", "Sing a song."]
    (proj / "instr.txt").write_text("\n".join(asks) + "\n", encoding="utf-8")
    with open(proj / "persllm.toml", "a") as f:
        f.write("review_samples = 1\n")
    (proj / "standards.txt").write_text("# comment\nKeep answers under three sentences.\n", encoding="utf-8")
    r = cli("annotate", "--instructions", "instr.txt", "--stage", "early", "--cot", "--review",
            "--feedback", "standards.txt", "--concurrency", "1", "--pattern", "thought",
            input="Use more of his slang.\nok\n")
    assert r.exit_code == 0, r.output
    recs = records(proj)
    assert [x["messages"][0]["content"] for x in recs] == asks   # concurrency 1: file order
    assert all(x["pattern"] == "instruction" and x["source"]["file"] == "instr.txt" and x["analysis"] for x in recs)
    prompts = user_prompts(fake_openai)
    assert "Keep answers under three sentences." in prompts[0] and "slang" not in prompts[0]
    assert "Use more of his slang." in prompts[-1] and "<instruction>" in prompts[-1]
    assert "Use more of his slang." in prompts[1]          # the second review round already has it
    assert "Q: Tell me about your best friend." in r.stderr
    meta = json.loads((proj / "build/annotations.jsonl.meta.json").read_text())
    assert meta["standards"] == ["Keep answers under three sentences.", "Use more of his slang."]
    key = fake_openai.api_key.encode()
    for base in (proj, Path(os.environ["PERSLLM_HOME"])):
        for f in base.rglob("*"):
            if f.is_file():
                assert key not in f.read_bytes(), f


def test_review_that_uses_the_whole_limit_is_not_nothing_to_do(cli, proj, fake_openai):
    with open(proj / "persllm.toml", "a") as f:
        f.write("review_samples = 2\n")
    r = cli("annotate", "--review", "--limit", "2", "--concurrency", "1", input="ok\n")
    assert r.exit_code == 0, r.output
    assert len(records(proj)) == 2 and "nothing to do" not in r.stderr


# ------------------------------------------------------------------------------ kill -9 and resume

def test_resume_after_kill_9(tmp_path, cli):
    paras = [f"Paragraph number {i} tells how Harry flew over the lake on a broom." for i in range(24)]
    root = make_project(cli, tmp_path / "k", early=paras)
    port_file = tmp_path / "url"
    env = subprocess_env()
    server = subprocess.Popen([sys.executable, "-m", "tests.fakes.openai_server", "--latency", "0.25",
                               "--port-file", str(port_file)], cwd=REPO, env=env)
    try:
        for _ in range(100):
            if port_file.exists():
                break
            time.sleep(0.05)
        env.update(OPENAI_API_KEY="sk-fake-test-key-0123456789", OPENAI_BASE_URL=port_file.read_text())
        out = root / "build/annotations.jsonl"

        def start_and_stop(sig: int, at_least: int) -> int:
            proc = subprocess.Popen([*persllm_cmd(), "annotate", "--stage", "early", "--concurrency", "3"],
                                    cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            deadline = time.time() + 30
            while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < at_least):
                time.sleep(0.05)
            os.kill(proc.pid, sig)
            proc.communicate(timeout=30)
            return proc.returncode

        assert start_and_stop(signal.SIGINT, 3) == 130          # Ctrl-C: stop sending, keep what is written
        n_after_ctrl_c = len(read_jsonl(out))
        assert start_and_stop(signal.SIGKILL, n_after_ctrl_c + 3) == -signal.SIGKILL
        assert n_after_ctrl_c + 3 <= len(read_jsonl(out)) < 24
        r = run_persllm("annotate", "--stage", "early", "--concurrency", "8", cwd=root, env=env)
        assert r.returncode == 0, r.stderr
    finally:
        server.kill()
        server.wait()
    recs = read_jsonl(out)
    ok_ids = [x["id"] for x in recs if x["status"] == "ok"]
    expected = {record_id("Harry Potter", "early", "ordinary", "data/early/knowledge.txt", i, 0) for i in range(1, 25)}
    assert set(ok_ids) == expected and len(ok_ids) == 24          # every id once, none twice
    assert len(recs) == 24


# ------------------------------------------------------------------------------ local backend

@pytest.mark.slow
def test_local_backend_with_smollm2(cli, proj, smollm2, monkeypatch):
    """The 135M model never keeps the labelled format by itself; guided by the labels we write it
    gives usable records, and the labels stay out of the stored text."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: one thread is several times faster here
    monkeypatch.setenv("PERSLLM_ANNOTATE_KNOWLEDGE_WORDS", "150")
    monkeypatch.setenv("PERSLLM_ANNOTATE_STYLE_WORDS", "50")
    try:
        with open(proj / "persllm.toml", "a") as f:
            f.write("max_tokens = 48\ntemperature = 0.0\n")
        r = cli("annotate", "--backend", "local", "--limit", "2", "--max-retries", "0", "--concurrency", "2")
    finally:
        torch.set_num_threads(threads)
    assert r.exit_code == 0, r.output
    recs = records(proj)
    assert len(recs) == 2
    for x in recs:
        a = x["annotator"]
        assert a["backend"] == "local" and a["model"] == "smollm2-135m" and a["cost_usd"] == 0
        assert a["prompt_tokens"] > 100 and 0 < a["completion_tokens"] <= 48
        assert x["status"] == "ok" and x["error"] is None
        (q, ans) = (m["content"] for m in x["messages"])
        assert q.strip() and ans.strip() and "\n" not in q
        for text in (q, ans):
            assert "[Question]" not in text and "[Response]" not in text and "[Analysis]" not in text


@pytest.mark.slow
def test_ctrl_c_during_local_generation_exits_130(proj, smollm2):
    """Ctrl-C while a worker thread is inside torch: the worker stops between tokens and is joined
    before the interpreter exits (a thread still in torch then aborted the process: exit 134,
    "terminate called without an active exception")."""
    env = subprocess_env(PERSLLM_ANNOTATE_KNOWLEDGE_WORDS="100", PERSLLM_ANNOTATE_STYLE_WORDS="50",
                         PERSLLM_ANNOTATE_MAX_TOKENS="48", OMP_NUM_THREADS="1")
    out = proj / "build/annotations.jsonl"
    proc = subprocess.Popen([*persllm_cmd(), "annotate", "--backend", "local", "--limit", "3", "--concurrency", "1"],
                            cwd=proj, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and not (out.exists() and out.read_text().count("\n")):
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGINT)  # the first record is written: the worker is generating the next
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "terminate called" not in err
    recs = records(proj)  # valid JSONL, nothing torn
    assert 1 <= len(recs) < 3 and all(x["status"] == "ok" for x in recs)
    side = json.loads((proj / "build/annotations.jsonl.meta.json").read_text())
    assert side["counts"]["ok"] == len(recs) and side["last_run"] == {"interrupted": True}


# ------------------------------------------------------------------------------ retrieval and prices

def test_retrieval_seed_first_budget_counted_cjk():
    from persllm_cli.data.corpus import Paragraph
    from persllm_cli.data.retrieval import Index

    paras = [Paragraph(1, "哈利在霍格沃茨打魁地奇"), Paragraph(3, "罗恩和哈利是朋友"),
             Paragraph(4, "魁地奇比赛很精彩"), Paragraph(7, "今天下雨了很冷很冷很冷很冷")]
    idx = Index(paras, "tfidf")
    # 11 + 8 + 8 + 13 CJK "words": a budget of 20 holds the seed (line 4, 8 words) and line 1.
    assert idx.context("魁地奇比赛很精彩", 20, first=4) == [4, 1]
    assert idx.context("魁地奇比赛很精彩", 0, first=4) == [4]
    assert idx.context("罗恩和哈利", 100)[0] == 3 and len(idx.context("罗恩和哈利", 100)) == 4
    assert idx.text([3, 1]) == ["罗恩和哈利是朋友", "哈利在霍格沃茨打魁地奇"]


def test_prices_known_prefixed_and_overridden():
    from persllm_cli.llm.pricing import pricing

    def price_for(model, table):
        p = pricing(model, table)
        return p.price, p.known

    assert price_for("gpt-4o-mini-2024-07-18", {})[0].input == 0.15       # longest prefix wins
    assert price_for("gpt-4o-2024-08-06", {})[0].output == 10.0
    assert price_for("my-llama", {"my-llama": [1, 2]})[0].cost(1_000_000, 1_000_000) == 3.0
    assert price_for("my-llama", {}) == (price_for("my-llama", {})[0], False)
    from persllm_cli.core.errors import PersllmError

    for bad in ([-1.0, 2.0], [1.0, "a"], [1.0], "x", [True, 1.0]):  # one clear line, never a traceback
        with pytest.raises(PersllmError, match="must be \\[input, output\\]"):
            price_for("my-llama", {"my-llama": bad})


def test_key_rejected_mid_run_keeps_what_was_written(cli, proj, fake_openai):
    fake_openai.push(Reply("[Question] Q?\n[Response] A."), Fail(401))
    r = cli("annotate", "--stage", "early", "--concurrency", "1")
    assert r.exit_code == 1 and "rejected the API key" in r.output
    assert [x["status"] for x in records(proj)] == ["ok"]
    assert len(fake_openai.completions()) == 2                 # nothing sent after the fatal error


def test_read_instructions_txt_and_jsonl(tmp_path):
    from persllm_cli.annotate.command import read_instructions
    from persllm_cli.core.errors import PersllmError

    f = tmp_path / "i.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"},
                                          {"role": "assistant", "content": "old"}, {"role": "user", "content": "again"},
                                          {"role": "assistant", "content": "drop me"}]}) + "\n\n"
                 + json.dumps({"instruction": "Sing."}) + "\n", encoding="utf-8")
    (a, conv), (b, conv2) = read_instructions(f)
    assert (a, b) == (1, 3) and [m["content"] for m in conv] == ["hi", "old", "again"]
    assert conv2 == [{"role": "user", "content": "Sing."}]
    f.write_text('{"messages": [{"role": "assistant", "content": "x"}]}\n', encoding="utf-8")
    with pytest.raises(PersllmError, match=r"i.jsonl:1: no user message"):
        read_instructions(f)

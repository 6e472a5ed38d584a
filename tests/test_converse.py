"""`persllm converse`: speaker specs and their errors, API personas against the fake server (two and
three speakers, resume, budget, dry run, judge), a trained smollm2 run at two stages, and Ctrl-C
in a real subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, persllm_cmd, subprocess_env
from tests.fakes.openai_server import Reply
from tests.run_factory import make_run

SCENE = "You meet in the Gryffindor common room late at night."


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def _session_run(_embedded_models, tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("converse-runs") / "r1", _embedded_models / "smollm2-135m")


@pytest.fixture
def conv_run(_session_run, smollm2) -> Path:
    return _session_run


# ----------------------------------------------------------------------------- speaker specs

def test_parse_spec_forms(tmp_path, monkeypatch):
    from persllm_cli.converse.speakers import parse_spec

    monkeypatch.chdir(tmp_path)
    (tmp_path / "other").mkdir()
    s = parse_spec("runs/sft@early")
    assert (s.kind, s.target, s.stage) == ("run", "runs/sft", "early")
    s = parse_spec("runs/sft")
    assert (s.kind, s.target, s.stage) == ("run", "runs/sft", None)
    s = parse_spec("api:gpt-4o@late")
    assert (s.kind, s.target, s.project, s.stage) == ("api", "gpt-4o", None, "late")
    s = parse_spec("api:gpt-4o:other@late")
    assert (s.kind, s.target, s.project, s.stage) == ("api", "gpt-4o", Path("other"), "late")
    s = parse_spec("api:llama3:8b@late")  # "8b" is no folder: part of the model name
    assert (s.target, s.project) == ("llama3:8b", None)


def test_missing_run_is_one_line(cli, project):
    r = cli("converse", "runs/nowhere@early", "api:fake-model@late", "--scene", SCENE)
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr.strip().splitlines() == ["error: speaker 'runs/nowhere@early': run directory not found: runs/nowhere"]


def test_project_without_a_run_is_one_line(cli, project):
    r = cli("converse", ".@early", ".@late", "--scene", SCENE)
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1
    assert "has no trained run yet" in r.stderr


def test_unknown_stage_is_one_line(cli, project, _session_run, fake_openai):
    r = cli("converse", f"{_session_run}@nope", "api:fake-model@late", "--scene", SCENE)
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1
    assert "unknown stage 'nope' (stages: early, middle, late)" in r.stderr
    r = cli("converse", "api:fake-model@middle", "api:fake-model@late", "--scene", SCENE)
    assert r.exit_code == 1 and "unknown stage 'middle' (stages: early, late)" in r.stderr
    assert fake_openai.completions() == []


def test_project_without_material_is_one_line(cli, project, fake_openai):
    (project / "data/late/knowledge.txt").write_text("", encoding="utf-8")
    r = cli("converse", "api:fake-model@early", "api:fake-model@late", "--scene", SCENE)
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1
    assert "has no material for stage 'late'" in r.stderr
    assert fake_openai.completions() == []


def test_api_speaker_outside_a_project(cli, tmp_path, fake_openai):
    r = cli("converse", "api:fake-model@early", "api:fake-model@late", "--scene", SCENE)
    assert r.exit_code == 1 and "needs a persllm project" in r.stderr


def test_usage_errors(cli, project):
    assert cli("converse", "api:fake-model@early", "--scene", SCENE).exit_code == 2
    assert cli("converse", "api:m@early", "api:m@late", "--scene", SCENE, "--first", "3").exit_code == 2
    assert cli("converse", "api:m@early", "api:m@late", "--scene", SCENE, "--turns", "0").exit_code == 2


def test_scene_is_required_to_start(cli, project, fake_openai):
    r = cli("converse", "api:fake-model@early", "api:fake-model@late", "--turns", "2")
    assert r.exit_code == 2 and "--scene" in r.stderr


# ----------------------------------------------------------------------------- API personas

def test_two_api_personas_take_turns_from_their_own_side(cli, project, fake_openai):
    fake_openai.push(Reply("Who are you? You look like my dad."), Reply("I am you, twenty years on."),
                     Reply("Blimey."), Reply("Sit down, Harry."))
    r = cli("converse", "api:fake-model@early", "api:fake-model@late", "--scene", SCENE, "--turns", "4",
            "-o", "talk.jsonl")
    assert r.exit_code == 0, r.stderr
    assert r.stdout.splitlines()[0] == "Harry Potter (early): Who are you? You look like my dad."
    assert "Harry Potter (late): I am you, twenty years on." in r.stdout
    recs = read_jsonl(project / "talk.jsonl")
    assert [x["speaker"] for x in recs] == ["Harry Potter (early)", "Harry Potter (late)"] * 2
    assert [x["stage"] for x in recs] == ["early", "late", "early", "late"]
    assert recs[0]["scene"] == SCENE and "scene" not in recs[1]
    for x in recs:
        assert x["persona"] == "Harry Potter" and x["kind"] == "api" and x["model"] == "fake-model"
        assert x["tokens"] > 0 and x["seconds"] >= 0 and x["cost"] is None  # fake-model has no price
    reqs = [q.body["messages"] for q in fake_openai.completions()]
    assert len(reqs) == 4
    # Turn 1 (early opens): the scene as the user's message, early's material in the system prompt.
    assert [m["role"] for m in reqs[0]] == ["system", "user"] and reqs[0][1]["content"] == SCENE
    assert "first year at Hogwarts" in reqs[0][0]["content"] and "Auror" not in reqs[0][0]["content"]
    # Turn 2 (late): the scene and early's line as one user message.
    assert reqs[1][1] == {"role": "user", "content": SCENE + "\n\nWho are you? You look like my dad."}
    assert "after the war" in reqs[1][0]["content"]
    # Turn 4 (late): its own line as the assistant's.
    assert [m["role"] for m in reqs[3]] == ["system", "user", "assistant", "user"]
    assert reqs[3][2]["content"] == "I am you, twenty years on." and reqs[3][3]["content"] == "Blimey."
    md = (project / "talk.md").read_text()
    assert SCENE in md and "**Harry Potter (late):** Sit down, Harry." in md and "## Summary" in md
    assert "BLEU between speakers" in r.stderr and fake_openai.api_key not in r.stdout + r.stderr + md


def test_api_lines_stream_under_the_speakers_name_with_the_servers_token_counts(cli, project, fake_openai,
                                                                                monkeypatch):
    from persllm_cli.converse import command

    writes: list[str] = []
    real = command._write
    monkeypatch.setattr(command, "_write", lambda text: (writes.append(text), real(text)))
    fake_openai.push(Reply("Who are you? You look like my dad."), Reply("I am you, twenty years on."))
    r = cli("converse", "api:fake-model@early", "api:fake-model@late", "--scene", SCENE, "--turns", "2")
    assert r.exit_code == 0, r.stderr
    # The line came in pieces (the fake sends a chunk per word), each written as it arrived.
    line = writes[writes.index("Harry Potter (early): ") + 1:]
    assert line[:3] == ["Who ", "are ", "you? "]
    assert r.stdout.splitlines()[0] == "Harry Potter (early): Who are you? You look like my dad."
    recs = read_jsonl(project / "build/converse.jsonl")
    # The server's own count (usage asked for in the stream): 8 words, 8 tokens for the fake.
    assert [x["tokens_from"] for x in recs] == ["server", "server"] and recs[0]["tokens"] == 8
    assert all(q.body["stream"] and q.body["stream_options"] == {"include_usage": True}
               for q in fake_openai.completions())


def test_a_server_without_usage_gets_an_estimate_said_in_the_transcript(cli, project, fake_openai):
    fake_openai.usage = False
    fake_openai.push(Reply("Blimey."), Reply("Sit down, Harry."))
    r = cli("converse", "api:fake-model@early", "api:fake-model@late", "--scene", SCENE, "--turns", "2")
    assert r.exit_code == 0, r.stderr
    recs = read_jsonl(project / "build/converse.jsonl")
    assert [x["tokens_from"] for x in recs] == ["estimate", "estimate"]
    assert recs[1]["tokens"] > 0 and "Harry Potter (late): Sit down, Harry." in r.stdout


def test_a_line_cut_off_mid_stream_is_retried_and_said(cli, project, fake_openai):
    from tests.fakes.openai_server import Stall

    with open(project / "persllm.toml", "a") as f:
        f.write("[converse]\nbackoff_seconds = 0.01\n")
    # The first attempt sends its first word, then goes silent past --timeout.
    fake_openai.responder = lambda body, n: "Well, I never thought I would see you."
    fake_openai.push(Stall(1.5), Reply("Hello there, old me."), Reply("Hello, young me."))
    r = cli("converse", "api:fake-model@early", "api:fake-model@late", "--scene", SCENE, "--turns", "2",
            "--timeout", "0.3")
    assert r.exit_code == 0, r.stderr
    first, again = r.stdout.splitlines()[:2]
    assert first == "Harry Potter (early): Well, [cut off]"
    assert again == "Harry Potter (early): Hello there, old me."
    assert "retrying" in r.stderr
    recs = read_jsonl(project / "build/converse.jsonl")
    assert [x["text"] for x in recs] == ["Hello there, old me.", "Hello, young me."]
    assert len(fake_openai.completions()) == 3


def test_three_speakers_name_the_others_and_first_picks_the_opener(cli, project, fake_openai):
    fake_openai.push(*[Reply(f"line {i}") for i in range(1, 5)])
    r = cli("converse", "api:fake-model@early", "api:fake-model@late", "api:gpt-4o-mini@late",
            "--scene", SCENE, "--turns", "4", "--first", "2")
    assert r.exit_code == 0, r.stderr
    recs = read_jsonl(project / "build/converse.jsonl")
    names = ["Harry Potter (late, fake-model)", "Harry Potter (late, gpt-4o-mini)", "Harry Potter (early)",
             "Harry Potter (late, fake-model)"]
    assert [x["speaker"] for x in recs] == names
    reqs = [q.body for q in fake_openai.completions()]
    assert [q["model"] for q in reqs] == ["fake-model", "gpt-4o-mini", "fake-model", "fake-model"]
    # The third speaker (early) sees both lines before it as one user message, each named.
    assert reqs[2]["messages"][1]["content"] == (f"{SCENE}\n\nHarry Potter (late, fake-model): line 1\n\n"
                                                 "Harry Potter (late, gpt-4o-mini): line 2")
    # The opener, on its second turn: its own line as the assistant's, the two others named.
    assert [m["role"] for m in reqs[3]["messages"]] == ["system", "user", "assistant", "user"]
    assert reqs[3]["messages"][3]["content"] == "Harry Potter (late, gpt-4o-mini): line 2\n\nHarry Potter (early): line 3"


def test_rerun_continues_and_refuses_other_speakers(cli, project, fake_openai):
    args = ("api:fake-model@early", "api:fake-model@late", "--scene", SCENE)
    fake_openai.push(Reply("one"), Reply("two"), Reply("three"), Reply("four"))
    assert cli("converse", *args, "--turns", "2").exit_code == 0
    r = cli("converse", "api:fake-model@early", "api:fake-model@late", "--turns", "4")  # the scene from the file
    assert r.exit_code == 0, r.stderr
    assert "continuing converse.jsonl after turn 2 of 4" in r.stderr
    assert [x["text"] for x in read_jsonl(project / "build/converse.jsonl")] == ["one", "two", "three", "four"]
    assert r.stdout.startswith("Harry Potter (early): one\n\nHarry Potter (late): two\n\n")
    third = fake_openai.completions()[2].body["messages"]
    assert [m["role"] for m in third] == ["system", "user", "assistant", "user"] and third[3]["content"] == "two"
    n = len(fake_openai.completions())
    r = cli("converse", *args, "--turns", "4")
    assert r.exit_code == 0 and len(fake_openai.completions()) == n  # nothing left to say
    r = cli("converse", "api:fake-model@late", "api:fake-model@early", "--turns", "6")
    assert r.exit_code == 1 and "same speakers in the same order" in r.stderr
    r = cli("converse", *args[:2], "--scene", "Somewhere else.", "--turns", "6")
    assert r.exit_code == 1 and "another scene" in r.stderr
    assert len(read_jsonl(project / "build/converse.jsonl")) == 4


def test_retries_then_budget_stops_cleanly(cli, project, fake_openai):
    from tests.fakes.openai_server import Fail

    with open(project / "persllm.toml", "a") as f:
        f.write('[annotate.prices]\n"fake-model" = [1000.0, 1000.0]\n[converse]\nbackoff_seconds = 0.01\n')
    fake_openai.push(Fail(500), Reply("first"), Reply("second"))
    # $0.001 a token and a system prompt of some 300: the first turns fit in $0.9, a later one could pass it.
    r = cli("converse", "api:fake-model@early", "api:fake-model@late", "--scene", SCENE, "--turns", "8",
            "--max-new-tokens", "20", "--budget-usd", "0.9")
    assert r.exit_code == 3, r.stderr
    assert "budget" in r.stderr
    recs = read_jsonl(project / "build/converse.jsonl")
    assert 1 <= len(recs) < 8 and recs[0]["text"] == "first"
    assert 0 < sum(x["cost"] for x in recs) <= 0.9
    meta = json.loads((project / "build/converse.jsonl.meta.json").read_text())
    assert meta["last_run"]["stopped"] == "budget" and meta["last_run"]["cost_usd"] <= 0.9
    assert len(fake_openai.completions()) == len(recs) + 1  # the 500 was retried


def test_a_turn_waits_as_the_server_asks_then_gives_up_in_one_line(cli, project, fake_openai):
    """converse's turns retry by the runner's policy (llm/retry.py): Retry-After honoured, at most
    --max-retries retries, then one line."""
    from tests.fakes.openai_server import Fail

    with open(project / "persllm.toml", "a") as f:
        f.write("[converse]\nbackoff_seconds = 0.01\n")
    fake_openai.push(Fail(429, retry_after=1), Reply("first"))
    r = cli("converse", "api:fake-model@early", "api:fake-model@late", "--scene", SCENE, "--turns", "1")
    assert r.exit_code == 0, r.stderr
    refused, answered = fake_openai.completions()
    assert answered.time - refused.time >= 1.0
    fake_openai.push(Fail(500), Fail(500), Fail(500))
    r = cli("converse", "api:fake-model@early", "api:fake-model@late", "--turns", "2", "--max-retries", "1")
    assert r.exit_code == 1
    assert r.stderr.count("error:") == 1 and "(after 2 attempts); rerun to continue" in r.stderr
    assert len(fake_openai.completions()) == 4
    assert len(read_jsonl(project / "build/converse.jsonl")) == 1


def test_dry_run_sends_nothing(cli, project, fake_openai, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    r = cli("converse", "api:gpt-4o@early", "api:gpt-4o-mini@late", "--scene", SCENE, "--turns", "4", "--dry-run")
    assert r.exit_code == 1 and "OPENAI_API_KEY" in r.stderr  # the backends are built from the key
    monkeypatch.setenv("OPENAI_API_KEY", fake_openai.api_key)
    r = cli("converse", "api:gpt-4o@early", "api:gpt-4o-mini@late", "--scene", SCENE, "--turns", "4", "--dry-run")
    assert r.exit_code == 0, r.stderr
    assert "dry run: converse gpt-4o" in r.stderr and "dry run: converse gpt-4o-mini" in r.stderr
    assert fake_openai.requests == [] and not (project / "build/converse.jsonl").exists()


def test_judge_gives_a_verdict_per_turn_with_counts(cli, project, fake_openai):
    fake_openai.push(Reply("Hello, old me."), Reply("Hello, young me."),
                     Reply("IN CHARACTER: yes\nIN STAGE: yes\nHe sounds eleven."),
                     Reply("no verdict here"),
                     Reply("IN CHARACTER: yes\nIN STAGE: no\nHe speaks of things he cannot know yet."))
    with open(project / "persllm.toml", "a") as f:
        f.write("[converse]\nbackoff_seconds = 0.01\n")
    r = cli("converse", "api:fake-model@early", "api:fake-model@late", "--scene", SCENE, "--turns", "2",
            "--judge", "fake-model")
    assert r.exit_code == 0, r.stderr
    verdicts = read_jsonl(project / "build/converse.judge.jsonl")
    assert [(v["turn"], v["in_character"], v["in_stage"]) for v in verdicts] == [(0, "yes", "yes"), (1, "yes", "no")]
    judge_prompt = fake_openai.completions()[2].body["messages"][0]["content"]
    assert "Hello, old me." in judge_prompt and "first year at Hogwarts" in judge_prompt
    assert "in character 1/1, in stage 1/1" in r.stderr and "in character 1/1, in stage 0/1" in r.stderr
    md = (project / "build/converse.md").read_text()
    assert "judge, Harry Potter (late): in character 1/1, in stage 0/1" in md
    n = len(fake_openai.completions())
    assert cli("converse", "api:fake-model@early", "api:fake-model@late", "--turns", "2",
               "--judge", "fake-model").exit_code == 0
    assert len(fake_openai.completions()) == n  # verdicts are reused


# ----------------------------------------------------------------------------- a trained run (slow)

@pytest.mark.slow
def test_one_run_at_two_stages_and_an_api_persona(cli, project, conv_run, fake_openai):
    """The same trained run speaks at two stages (loaded once), with a prompted API persona."""
    fake_openai.push(Reply("I am the prompted Harry."))
    r = cli("converse", f"{conv_run}@early", f"{conv_run}@late", "api:fake-model@late", "--scene", SCENE,
            "--turns", "3", "--temperature", "0", "--max-new-tokens", "12")
    assert r.exit_code == 0, r.stderr
    assert r.stderr.count("Loading") == 1
    recs = read_jsonl(project / "build/converse.jsonl")
    assert [(x["kind"], x["stage"]) for x in recs] == [("run", "early"), ("run", "late"), ("api", "late")]
    for x in recs[:2]:
        assert x["model"] == "r1" and x["cost"] == 0 and 0 < x["tokens"] <= 12 and x["text"].strip()
        assert "<TIME" not in x["text"] and "im_start" not in x["text"]
    # The prompted persona sees both run lines, named (three speakers).
    sent = fake_openai.completions()[0].body["messages"][1]["content"]
    assert sent.startswith(SCENE) and f"Harry Potter (early): {recs[0]['text']}" in sent
    assert f"Harry Potter (late, r1): {recs[1]['text']}" in sent
    # Names carry the run or model only where two would read the same.
    assert [x["speaker"] for x in recs] == ["Harry Potter (early)", "Harry Potter (late, r1)",
                                            "Harry Potter (late, fake-model)"]


@pytest.mark.slow
def test_ctrl_c_keeps_finished_turns_and_the_rerun_continues(project, conv_run, tmp_path):
    out = tmp_path / "talk.jsonl"
    env = subprocess_env(OMP_NUM_THREADS="1")
    args = [f"{conv_run}@early", f"{conv_run}@late", "--scene", SCENE, "--temperature", "0", "-o", str(out)]
    proc = subprocess.Popen([*persllm_cmd(), "converse", *args, "--turns", "40", "--max-new-tokens", "48"],
                            cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and not (out.exists() and out.read_text().count("\n") >= 1):
            time.sleep(0.05)
        time.sleep(0.3)  # into the next turn's generation
        os.kill(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "terminate called" not in err and "Traceback" not in err
    recs = read_jsonl(out)
    assert 1 <= len(recs) < 40 and [x["turn"] for x in recs] == list(range(len(recs)))
    assert json.loads((tmp_path / "talk.jsonl.meta.json").read_text())["last_run"]["stopped"] == "interrupted"
    done = len(recs)
    r = subprocess.run([*persllm_cmd(), "converse", *args[:2], "-o", str(out), "--turns", str(done + 1),
                        "--temperature", "0", "--max-new-tokens", "8"],
                       cwd=project, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    recs = read_jsonl(out)
    assert len(recs) == done + 1 and recs[-1]["stage"] == ("early" if done % 2 == 0 else "late")
    assert (tmp_path / "talk.md").read_text().count("**Harry Potter (") >= done + 1


def _word_runs(text: str, n: int) -> list[tuple[str, ...]]:
    words = text.split()
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


@pytest.mark.slow
def test_a_run_never_echoes_the_conversation(cli, project, conv_run):
    """Greedy, where a small model most readily repeats the other speaker: by default a trained run
    never says a run of 4 tokens already in its view (the scene, earlier lines, its own line), so
    no 6 words repeat anywhere in the transcript (the inner 4 of them are the same tokens wherever
    they stand)."""
    r = cli("converse", f"{conv_run}@early", f"{conv_run}@late", "--scene", SCENE, "--turns", "6",
            "--temperature", "0", "--max-new-tokens", "24")
    assert r.exit_code == 0, r.stderr
    lines = [x["text"] for x in read_jsonl(project / "build/converse.jsonl")]
    assert len(lines) == 6 and all(t.strip() for t in lines)
    seen = set(_word_runs(SCENE, 6))
    for t in lines:
        runs = _word_runs(t, 6)
        assert len(runs) == len(set(runs)), t        # not within the line either
        assert not seen & set(runs), (t, seen & set(runs))
        seen |= set(runs)
    meta = json.loads((project / "build/converse.jsonl.meta.json").read_text())
    assert meta["settings"]["no_repeat_ngram"] == 4

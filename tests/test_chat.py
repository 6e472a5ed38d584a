"""`persllm chat`: one-shot, piped, --json, errors, the API path against the fake server, and the
interactive mode driven for real in a pseudo-terminal."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, persllm_cmd, subprocess_env
from tests.fakes.openai_server import Reply
from tests.run_factory import make_run

GREEDY = ("--temperature", "0", "--max-new-tokens", "16")


@pytest.fixture(scope="session")
def _session_run(_embedded_models, tmp_path_factory) -> Path:
    """One real run (smollm2 + untrained LoRA + time tokens) for the whole session."""
    return make_run(tmp_path_factory.mktemp("chat-runs") / "r1", _embedded_models / "smollm2-135m")


@pytest.fixture
def chat_run(_session_run, smollm2) -> Path:
    """The session's run; `smollm2` links the base model into this test's PERSLLM_HOME."""
    return _session_run


def _copy_run(src: Path, dst: Path, **changes) -> Path:
    """A run whose run.json differs; the big parts are links to the original."""
    dst.mkdir(parents=True)
    for part in ("adapter", "tokenizer"):
        (dst / part).symlink_to(src / part, target_is_directory=True)
    data = json.loads((src / "run.json").read_text())
    data.update(changes)
    (dst / "run.json").write_text(json.dumps(data))
    return dst


# ----------------------------------------------------------------------------- errors (no model)

def test_unknown_stage_is_one_line(cli, _session_run):
    r = cli("chat", str(_session_run), "--stage", "nope", "--prompt", "hi")
    assert r.exit_code == 1
    assert r.stdout == ""
    assert r.stderr.strip().splitlines() == ["error: unknown stage 'nope' (stages: early, middle, late)"]


def test_missing_run_directory(cli):
    r = cli("chat", "runs/nowhere", "--prompt", "hi")
    assert r.exit_code == 1
    assert "run directory not found" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_no_run_yet_in_a_project(cli, tmp_path, monkeypatch):
    assert cli("init", str(tmp_path / "p"), "--name", "Ann", "--stage", "a").exit_code == 0
    monkeypatch.chdir(tmp_path / "p")
    r = cli("chat", "--prompt", "hi")
    assert r.exit_code == 1
    assert "no trained run yet" in r.stderr


def test_incomplete_run(cli, _session_run, tmp_path):
    run = _copy_run(_session_run, tmp_path / "half", complete=False)
    r = cli("chat", str(run), "--prompt", "hi")
    assert r.exit_code == 1
    assert "incomplete" in r.stderr and r.stdout == ""
    (run / "adapter").unlink()  # a link to the session run: unlink, never rmtree
    (run / "run.json").write_text(json.dumps({**json.loads((run / "run.json").read_text()), "complete": True}))
    r = cli("chat", str(run), "--prompt", "hi")
    assert r.exit_code == 1 and "incomplete (adapter)" in r.stderr


def test_bad_numbers_are_usage_errors(cli, _session_run):
    assert cli("chat", str(_session_run), "--max-new-tokens", "0", "--prompt", "x").exit_code == 2
    assert cli("chat", str(_session_run), "--temperature", "-1", "--prompt", "x").exit_code == 2
    assert cli("chat", str(_session_run), "--prompt", "  ").exit_code == 2  # nothing to answer


# ----------------------------------------------------------------------------- prompt building

def test_prompt_starts_with_the_stage_token_then_the_template(_session_run):
    from transformers import AutoTokenizer

    from persllm_cli.model.chat_format import build_prompt, fit_messages, prompt_ids

    tok = AutoTokenizer.from_pretrained(_session_run / "tokenizer")
    msgs = [{"role": "user", "content": "Hello there"}]
    text = build_prompt(tok, msgs, "<TIME-II>")
    assert text == "<TIME-II>" + tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    ids = prompt_ids(tok, msgs, "<TIME-II>")
    assert ids[0] == tok.convert_tokens_to_ids("<TIME-II>")  # one token, not split into pieces
    assert text.endswith("<|im_start|>assistant\n")

    # History trimming drops whole old exchanges and keeps the system message and the last question.
    convo = [{"role": "system", "content": "Be brief."}]
    for i in range(6):
        convo += [{"role": "user", "content": f"question {i} " * 20}, {"role": "assistant", "content": f"answer {i} " * 20}]
    convo.append({"role": "user", "content": "last one"})
    full = len(prompt_ids(tok, convo, "<TIME-I>"))
    kept, dropped = fit_messages(tok, convo, "<TIME-I>", full - 10)
    assert dropped == 2 and kept[0]["role"] == "system" and kept[1]["content"].startswith("question 1")
    assert kept[-1]["content"] == "last one"
    assert fit_messages(tok, convo, "<TIME-I>", full) == (convo, 0)


# ----------------------------------------------------------------------------- the model (slow)

@pytest.mark.slow
def test_prompt_prints_only_the_answer(cli, chat_run):
    r = cli("chat", str(chat_run), "--prompt", "Who are you?", *GREEDY)
    assert r.exit_code == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 1 and lines[0].strip() and r.stdout.endswith("\n")
    assert "<TIME" not in r.stdout and "im_start" not in r.stdout and "Loading" not in r.stdout
    assert "Loading" in r.stderr


@pytest.mark.slow
def test_piped_lines_are_independent_questions(cli, chat_run):
    r = cli("chat", str(chat_run), *GREEDY, input="Who are you?\n\nWho are you?\nWhere do you live?\n")
    assert r.exit_code == 0, r.stderr
    lines = r.stdout.split("\n")
    assert lines[-1] == "" and len(lines) == 4  # blank input lines get no answer
    first, second, third = lines[:3]
    assert first and third
    assert first == second  # greedy and no history: the same question gets the same answer


@pytest.mark.slow
def test_json_lines_carry_stage_prompt_and_answer(cli, chat_run):
    r = cli("chat", str(chat_run), "--json", "--stage", "early", *GREEDY, input="Hello\nWho are you?\n")
    assert r.exit_code == 0, r.stderr
    objs = [json.loads(line) for line in r.stdout.splitlines()]
    assert [o["prompt"] for o in objs] == ["Hello", "Who are you?"]
    assert all(o["stage"] == "early" and o["answer"].strip() for o in objs)
    assert list(objs[0]) == ["stage", "prompt", "answer"]


@pytest.mark.slow
def test_adapter_for_another_base_is_a_clear_error(cli, chat_run, tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    tiny.save_pretrained(tmp_path / "tiny-base")
    run = _copy_run(chat_run, tmp_path / "wrong", base=str(tmp_path / "tiny-base"))
    r = cli("chat", str(run), "--prompt", "hi", *GREEDY)
    assert r.exit_code == 1
    assert r.stdout == ""
    (line,) = r.stderr.strip().splitlines()[-1:]
    assert f"adapter in {run.resolve()} does not fit base {tmp_path / 'tiny-base'}" in line
    assert "Traceback" not in r.stderr


def test_terminal_loads_while_the_user_types_and_a_failed_load_is_one_line(cli, chat_run, tmp_path, monkeypatch):
    """In a terminal the prompt comes up at once and the model loads behind it; if the load fails,
    the first message ends the session with one line and exit 1, never an answer."""
    import builtins
    import threading

    from persllm_cli.chat import command as chat
    from persllm_cli.model import load

    monkeypatch.setattr(chat, "_is_interactive", lambda s: True)
    run = _copy_run(chat_run, tmp_path / "broken")
    (run / "tokenizer").unlink()
    shutil.copytree(chat_run / "tokenizer", run / "tokenizer")
    (run / "tokenizer" / "tokenizer.json").write_text("{ not json", encoding="utf-8")
    release = threading.Event()
    real_load_run = load.load_run

    def held_load_run(path, **kw):  # the load cannot finish before the prompt is up
        assert release.wait(60)
        return real_load_run(path, **kw)

    monkeypatch.setattr(load, "load_run", held_load_run)
    real_input = builtins.input

    def typed(*a):
        release.set()  # the prompt is showing: now let the load go on (and fail)
        return real_input(*a)

    monkeypatch.setattr("builtins.input", typed)
    r = cli("chat", str(run), *GREEDY, input="Hello\nAgain\n")
    assert r.exit_code == 1, r.output
    assert r.stdout == ""
    assert r.stderr.index("you (late)>") < r.stderr.index("error:")
    assert r.stderr.count("error:") == 1 and "could not be loaded" in r.stderr
    assert "Traceback" not in r.stderr


# ----------------------------------------------------------------------------- API model
# (the `project` fixture, in conftest.py: two stages of short material for retrieval)

def test_api_model_streams_with_stage_material(cli, project, fake_openai):
    fake_openai.push(Reply("I was eleven,\nand it was brilliant."))
    r = cli("chat", "--api-model", "fake-model", "--stage", "early", "--prompt", "Tell me about Quidditch and the snitch")
    assert r.exit_code == 0, r.stderr
    assert r.stdout == "I was eleven,\nand it was brilliant.\n"
    (req,) = fake_openai.completions()
    body = req.body
    assert body["stream"] is True and body["model"] == "fake-model"
    system, user = body["messages"]
    assert system["role"] == "system" and user == {"role": "user", "content": "Tell me about Quidditch and the snitch"}
    assert "You are Harry Potter" in system["content"] and "Now it is first year at Hogwarts." in system["content"]
    assert "golden snitch" in system["content"] and "Blimey" in system["content"]
    assert "Auror" not in system["content"] and "temper" not in system["content"]  # not the late stage's
    assert fake_openai.api_key not in r.stdout + r.stderr


def test_api_model_piped_and_default_stage(cli, project, fake_openai):
    fake_openai.push(Reply("one\ntwo"), Reply("three"))
    r = cli("chat", "--api-model", "fake-model", "--system", "Answer in one sentence.",
            input="What is your job?\nWho is your son?\n")
    assert r.exit_code == 0, r.stderr
    assert r.stdout == "one two\nthree\n"
    reqs = fake_openai.completions()
    assert len(reqs) == 2
    for req in reqs:
        system = req.body["messages"][0]["content"]
        assert "after the war" in system and "Auror" in system and "Answer in one sentence." in system
        assert len(req.body["messages"]) == 2  # no history between piped lines


def test_api_model_needs_a_key(cli, project):
    r = cli("chat", "--api-model", "fake-model", "--prompt", "hi")
    assert r.exit_code == 1 and "OPENAI_API_KEY" in r.stderr


def test_api_model_unknown_model(cli, project, fake_openai):
    r = cli("chat", "--api-model", "nope", "--prompt", "hi")
    assert r.exit_code == 1 and "does not know the model 'nope'" in r.stderr


# ----------------------------------------------------------------------------- a real terminal

def _styled(text: str) -> str:
    """A regex for `text` as rich prints it on a terminal: maybe wrapped in style escape codes."""
    import re

    esc = r"(?:\x1b\[[0-9;]*m)*"
    return esc + re.escape(text.rstrip()) + esc + (" " if text.endswith(" ") else "")


@pytest.mark.slow
def test_interactive_session_in_a_pty(chat_run, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    env = subprocess_env(NO_COLOR="1", TERM="xterm", COLUMNS="200")
    cmd = persllm_cmd()
    # Room for a long answer, so that Ctrl-C can stop one while it streams.
    child = pexpect.spawn(cmd[0], [*cmd[1:], "chat", str(chat_run), "--temperature", "0", "--max-new-tokens", "64"],
                          cwd=str(tmp_path), env=env,
                          encoding="utf-8", timeout=120, dimensions=(40, 200))
    try:
        child.expect("Talking to Harry Potter at stage late")
        child.expect(_styled("you (late)> "))
        child.sendline("Hello")
        child.expect(_styled("Harry Potter> "))
        child.expect(_styled("you (late)> "))
        answer = child.before.strip()
        assert answer and any(c.isalpha() for c in answer)

        child.sendline("/stage early")
        child.expect_exact("(now at stage early: first year at Hogwarts)")
        child.expect(_styled("you (early)> "))
        child.sendline("/stage")
        child.expect_exact("* early: first year at Hogwarts")
        child.sendline("/save conv.jsonl")
        child.expect_exact("(saved 2 messages to conv.jsonl)")
        child.sendline("/reset")
        child.expect_exact("(conversation cleared)")
        child.sendline("/help")
        child.expect_exact("/save FILE")
        child.sendline("/bogus")
        child.expect_exact("unknown command /bogus")

        child.sendline("Tell me a very long story about a dragon.")
        child.expect(_styled("Harry Potter> ") + r"\S")  # the answer has begun streaming
        child.sendintr()
        child.expect_exact("(answer stopped; it is not kept in the conversation)")
        child.expect(_styled("you (early)> "))
        child.sendline("/save conv.jsonl")
        child.expect_exact("(nothing to save yet)")  # reset, and the stopped answer was not kept
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    (saved,) = [json.loads(line) for line in (tmp_path / "conv.jsonl").read_text().splitlines()]
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant"]
    assert saved["messages"][0]["content"] == "Hello"
    assert saved["messages"][1]["content"].split() == answer.split()


def test_api_model_and_a_run_together_is_a_usage_error(cli, project, fake_openai, tmp_path):
    r = cli("chat", str(tmp_path), "--api-model", "fake-model", "--prompt", "hi")
    assert r.exit_code == 2 and "not both" in r.stderr
    assert fake_openai.completions() == []


def test_conversation_drops_old_turns_and_says_so_once(capsys):
    from persllm_cli.persona.conversation import Conversation

    class Echo:
        persona = "Echo"
        stages = [("a", "the start")]

        def fit(self, messages, stage_id):
            # Pretend the window holds the system message plus the last three messages.
            keep = messages[:1] + messages[-3:] if messages[0]["role"] == "system" else messages[-3:]
            return keep, len(messages) - len(keep)

        def stream(self, messages, stage_id):
            yield "  re: "
            yield messages[-1]["content"]

    conv = Conversation(Echo(), "a", system="sys")
    for q in ("one", "two", "three"):
        assert "".join(conv.ask(q)) == f"re: {q}"  # leading whitespace of the answer is dropped
    assert [m["content"] for m in conv.history] == ["two", "re: two", "three", "re: three"]
    assert capsys.readouterr().err.count("oldest turns are dropped") == 1
    assert "".join(conv.ask("alone", remember=False)) == "re: alone"
    assert len(conv.history) == 4


def test_api_conversation_sends_history_and_retrieves_per_message(project, fake_openai):
    from persllm_cli.core.project import open_project
    from persllm_cli.model.generate import Sampling
    from persllm_cli.persona.api import ApiSpeaker
    from persllm_cli.persona.conversation import Conversation

    fake_openai.push(Reply("Hagrid came."), Reply("The snitch, yes."))
    speaker = ApiSpeaker.for_project(open_project(project), "fake-model", None, Sampling(max_new_tokens=64, temperature=0.0))
    conv = Conversation(speaker, "early")
    assert "".join(conv.ask("Who told you that you were a wizard on your birthday?")) == "Hagrid came."
    conv.set_stage("late")
    assert "".join(conv.ask("Do you remember your son James?")) == "The snitch, yes."
    first, second = (r.body["messages"] for r in fake_openai.completions())
    assert "Hagrid told me" in first[0]["content"]
    assert [m["role"] for m in second] == ["system", "user", "assistant", "user"]
    assert second[2]["content"] == "Hagrid came."
    assert "after the war" in second[0]["content"] and second[0]["content"].index("James Sirius") < second[0]["content"].index("Auror")

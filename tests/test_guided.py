"""Guided generation for the local backend (persllm_cli/guided.py): the loop with a scripted model,
the notice about long prompts on CPU, and (slow) a trained run's time token going first."""

from __future__ import annotations

import pytest

from persllm_cli.annotate.prompts import parse_reply
from persllm_cli.model.guided import guided_reply, section_end

EOS = 0


class CharTokenizer:
    """One token per character; 0 is end of turn."""

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i != EOS)


class Script:
    """A stand-in model: after a context ending in a label, it 'writes' that label's script."""

    def __init__(self, scripts: dict[str, str]):
        self.scripts, self.contexts, self.pushed = scripts, [], []
        self.queue: list[int] = []

    def sync(self, ids):
        text = "".join(chr(i) for i in ids)
        self.contexts.append(text)
        label = next(k for k in self.scripts if text.endswith(k + "\n"))
        self.queue = [ord(c) for c in self.scripts[label]] + [EOS]

    def pick(self, temperature):
        return self.queue.pop(0) if self.queue else EOS

    def push(self, token):
        self.pushed.append(token)


def run(scripts, sections, max_tokens=100):
    model = Script(scripts)
    prompt = [ord(c) for c in "PROMPT "]
    out = guided_reply(model, CharTokenizer(), prompt, sections, max_tokens=max_tokens, temperature=0.0, eos={EOS})
    return out, model


def test_labels_are_ours_and_each_section_stops_where_it_should():
    out, model = run({"[Question]": "What did Hagrid tell you?\nI am a wizard.",
                      "[Response]": "That I was a wizard.\n**[Question]** Next?"}, ["question", "response"])
    assert out.text == "[Question]\nWhat did Hagrid tell you?\n[Response]\nThat I was a wizard."
    # every generated token counts, the ones cut off at a stop included (the newline, "**")
    assert out.generated == len("What did Hagrid tell you?\n") + len("That I was a wizard.\n**")
    # the model continues from the prompt and our labels, never from what was cut off
    assert model.contexts == ["PROMPT [Question]\n", "PROMPT [Question]\nWhat did Hagrid tell you?\n[Response]\n"]
    reply = parse_reply(out.text, cot=False, want_question=True)
    assert (reply.question, reply.response) == ("What did Hagrid tell you?", "That I was a wizard.")


def test_cot_blank_line_eos_and_caps():
    out, _ = run({"[Question]": "Why the cupboard?", "[Analysis]": "He is bitter.\n\nMore musing",
                  "[Response]": "Because the Dursleys hated magic." + "x" * 200}, ["question", "analysis", "response"],
                 max_tokens=60)
    q, a, r = out.text.split("\n[Analysis]\n")[0], *out.text.split("\n[Analysis]\n")[1].split("\n[Response]\n")
    assert q == "[Question]\nWhy the cupboard?"            # ended by EOS
    assert a == "He is bitter."                             # ended by a blank line
    assert r.startswith("Because the Dursleys") and len(r) < 60   # ended by the budget
    assert out.generated == 60
    assert parse_reply(out.text, cot=True, want_question=True).analysis == "He is bitter."


def test_empty_section_is_refused_by_the_parser_and_an_echoed_label_is_read_through():
    from persllm_cli.llm.runner import Malformed

    out, _ = run({"[Response]": ""}, ["response"])
    assert out.text == "[Response]\n" and out.generated == 1
    with pytest.raises(Malformed):
        parse_reply(out.text, cot=False, want_question=False)
    out, _ = run({"[Response]": "\n[Response]\nhello"}, ["response"])
    assert parse_reply(out.text, cot=False, want_question=False).response == "hello"


@pytest.mark.parametrize("text,one_line,end", [
    ("  \n", False, None), ("Hi", False, None), ("Hi\nthere", False, None), ("Hi\n\n", False, 2),
    ("Hi\n[", False, 2), ("Hi\n## R", False, 2), ("Hi\nAnswer: x", False, 2), ("Hi\nAnswer the", False, None),
    ("\nWhy?\n", True, 5), ("Why?", True, None),
])
def test_section_end(text, one_line, end):
    assert section_end(text, one_line=one_line) == end


def test_long_prompt_notice_only_with_default_budgets_on_cpu(tmp_path, cli, monkeypatch, capsys):
    from persllm_cli.annotate import command as annotate
    from persllm_cli.core.settings import resolve
    from persllm_cli.llm.annotator import AnnotateSettings
    from persllm_cli.llm.runner import Item

    class Fake:
        device = "cpu"

        def prompt_tokens(self, messages, stage_token=None):
            return 1500

    r = cli("init", str(tmp_path / "p"), "--name", "Ann", "--stage", "a:young")
    assert r.exit_code == 0, r.output
    from persllm_cli.core.project import load_project

    project = load_project(tmp_path / "p")
    s = resolve(AnnotateSettings, "annotate", {"backend": "local"}, project)
    item = Item("x", annotate.Job(project.stages[0], "ordinary", 0, {}, [], [], ["k"], ["s"]))
    ann = annotate.Annotator(project, s, [])
    annotate._local_notice(project, s, Fake(), ann, [item])
    assert "PERSLLM_ANNOTATE_KNOWLEDGE_WORDS=300" in capsys.readouterr().err
    monkeypatch.setenv("PERSLLM_ANNOTATE_KNOWLEDGE_WORDS", "1500")
    annotate._local_notice(project, s, Fake(), ann, [item])
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_run_puts_the_stage_token_first(tmp_path, smollm2):
    from persllm_cli.llm.local import LocalBackend
    from persllm_cli.llm.protocol import FatalError
    from tests.run_factory import make_run

    run_dir = make_run(tmp_path / "runs" / "r1", smollm2)
    backend = LocalBackend(str(run_dir))
    messages = [{"role": "user", "content": "Who are you?"}]
    c = backend.complete(messages, max_tokens=3, temperature=0.0, sections=["response"], stage_token="<TIME-II>")
    _, tok, decoder = backend._load()
    assert decoder.ids[0] == tok.convert_tokens_to_ids("<TIME-II>")
    assert c.text.startswith("[Response]\n") and 1 <= c.completion_tokens <= 3
    backend.complete(messages, max_tokens=1, temperature=0.0)          # no token given: the last stage's
    assert decoder.ids[0] == tok.convert_tokens_to_ids("<TIME-III>")
    with pytest.raises(FatalError, match="TIME-IX"):
        backend.complete(messages, max_tokens=1, temperature=0.0, stage_token="<TIME-IX>")

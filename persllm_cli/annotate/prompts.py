"""The annotator's prompts (templates/annotate/*.txt) and the parser for its labelled replies.

A reply has sections, each opened by a label on its own line: `[Question]`, `[Analysis]` (with
--cot) and `[Response]`. Models decorate labels, so `**[Response]**`, `Response:`, `## Response`
and `【回答】`-style brackets are read too. No [Response] text means the reply is malformed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from persllm_cli.data.records import Message
from persllm_cli.core.resources import render
from persllm_cli.llm.runner import Malformed


_LABELS = {
    "question": "question", "analysis": "analysis", "response": "response", "answer": "response",
    "问题": "question", "分析": "analysis", "回答": "response", "回复": "response",
}
_LABEL_RE = re.compile(
    r"^[ \t>#]*(?:\*\*|__|\*)?[ \t]*[\[【]?[ \t]*(?:\*\*)?[ \t]*"
    r"(question|analysis|response|answer|问题|分析|回答|回复)"
    r"[ \t]*(?:\*\*)?[ \t]*[\]】]?[ \t]*(?:\*\*|__|\*)?[ \t]*[:：]?[ \t]*(?:\*\*|__|\*)?[ \t]*",
    re.IGNORECASE | re.MULTILINE)


@dataclass
class Reply:
    question: str | None
    analysis: str | None
    response: str


def _sections(text: str) -> dict[str, str]:
    """Label -> text. A label counts only at the start of a line and when decorated (brackets,
    bold, heading, or a colon), so a response that merely starts with the word "Answer" stays text."""
    found: list[tuple[str, int, int]] = []
    for m in _LABEL_RE.finditer(text):
        token = m.group(0)
        decorated = any(c in token for c in "[]【】*_#:：")
        # The label must end its line or be followed by a colon/closing bracket/bold on the same line.
        if not decorated:
            continue
        found.append((_LABELS[m.group(1).lower()], m.start(), m.end()))
    out: dict[str, str] = {}
    for i, (name, _start, end) in enumerate(found):
        stop = found[i + 1][1] if i + 1 < len(found) else len(text)
        body = text[end:stop].strip()
        if name not in out or (not out[name] and body):
            out[name] = body
    return out


def parse_reply(text: str, *, cot: bool, want_question: bool, strip_prefix: str | None = None) -> Reply:
    """Read a reply; raise Malformed when something required is missing or empty."""
    if not text or not text.strip():
        raise Malformed("empty reply")
    s = _sections(text)
    response = s.get("response", "").strip()
    if not response:
        raise Malformed("no [Response] section" if "response" not in s else "empty [Response]")
    question = s.get("question", "").strip() or None
    if want_question and not question:
        raise Malformed("no [Question] section")
    if question and strip_prefix and question.startswith(strip_prefix):
        question = question[len(strip_prefix):].strip() or None
        if want_question and not question:
            raise Malformed("empty [Question]")
    analysis = s.get("analysis", "").strip() or None
    if cot and not analysis:
        raise Malformed("no [Analysis] section (asked for with --cot)")
    return Reply(question=question, analysis=analysis if cot else None, response=response)


def time_line(label: str) -> str:
    """The stage prefix: only ever part of the prompt, never of the stored question."""
    return f"Now it is {label}."


def standards_block(standards: list[str]) -> str:
    if not standards:
        return ""
    return render("annotate/standards.txt", items="\n".join(f"- {s}" for s in standards))


def build_messages(*, persona: str, description: str, stage_label: str, pattern: str, cot: bool,
                   time_prefix: bool, knowledge: list[str], style: list[str], standards: list[str],
                   instruction: list[Message] | None = None, variant: int = 0, guided: bool = False) -> list[Message]:
    """System + user messages for one annotation request.

    `pattern` is ordinary/error/thought, or "instruction" with `instruction` holding the user's
    conversation (its last user message is the instruction to answer). `variant` (the question
    index within a paragraph) asks for a different question when several are wanted. `guided`
    (a backend that writes the section labels itself, see guided.py) replaces the answer-format
    block, whose placeholder lines small models copy word for word, with one plain sentence.
    """
    desc = f" ({description})" if description else ""
    system = render("annotate/system.txt", persona=persona, description=desc)
    if pattern == "instruction":
        assert instruction
        conv = "\n\n".join(f"{m['role']}: {m['content']}" for m in instruction)
        task = render("annotate/instruction.txt", persona=persona, instruction=conv)
        fmt = render("annotate/format_cot_instruction.txt" if cot else "annotate/format_plain_instruction.txt",
                     persona=persona)
    else:
        task = render(f"annotate/{pattern}.txt", persona=persona)
        if variant:
            task += (f"\nThis is question {variant + 1} about this paragraph: ask about a different detail "
                     "or angle than an obvious first question would.")
        fmt = render("annotate/format_cot.txt" if cot else "annotate/format_plain.txt", persona=persona)
    if guided:
        steps = ([] if pattern == "instruction" else ["the question, on one line"]) + \
            ([f"how {persona} thinks about it"] if cot else []) + [f"{persona}'s answer, in the first person"]
        fmt = render("annotate/format_guided.txt", steps=", then ".join(steps))
    user = render("annotate/request.txt", persona=persona,
                  time_line=(time_line(stage_label) + "\n\n") if time_prefix else "",
                  knowledge_intro=(f"What {persona} knows:" if pattern == "instruction" else
                                   f"What {persona} knows (the first paragraph is the one to ask about):"),
                  knowledge="\n\n".join(knowledge) or "(none)", style="\n".join(style) or "(none)",
                  task=task.strip(), format=fmt.strip(), standards=standards_block(standards))
    return [{"role": "system", "content": system.strip()}, {"role": "user", "content": user.strip() + "\n"}]

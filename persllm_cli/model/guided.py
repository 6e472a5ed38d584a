"""Generation for the local backend, with section labels supplied by us.

A 135M model does not keep a labelled answer format, so when the caller says which sections the
reply must have (`[Question]`, `[Analysis]`, `[Response]`), we write each label and let the model
write every word of the section under it:

    assistant turn:  [Question]\\n  -> model writes one line
                     \\n[Response]\\n -> model writes until a label-like line, EOS or the cap

A section ends when the model starts a line that looks like a label (`[`, `**`, `#`, `Answer:`),
leaves a blank line, ends its turn (EOS) or reaches its token cap; a
question ends with its line. The text returned carries the labels, so the ordinary reply parser
reads it. Every generated token counts as a completion token, including those cut off at a stop.

`Decoder` drives a transformers causal LM with its KV cache (feed tokens, pick the next one, roll
back to a shared prefix); the loop itself only needs `sync`, `pick` and `push`, so tests can run
it with a scripted stand-in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Protocol

from persllm_cli.model.chat_format import text_ids

LABELS = {"question": "[Question]", "analysis": "[Analysis]", "response": "[Response]"}
QUESTION_CAP = 64   # tokens: a question is one line

# The start of a line that opens a new labelled section (decided as soon as its first marks appear).
_MARKED = re.compile(r"[ \t]*(?:\*\*|__|#|\[|【)")
_WORDED = re.compile(r"[ \t]*(?:question|analysis|response|answer|问题|分析|回答|回复)[ \t]*[:：]", re.IGNORECASE)


class Stepper(Protocol):
    def sync(self, ids: list[int]) -> None: ...
    def pick(self, temperature: float) -> int: ...
    def push(self, token: int) -> None: ...


def looks_like_label(line: str) -> bool:
    return bool(_MARKED.match(line) or _WORDED.match(line))


def section_end(text: str, *, one_line: bool) -> int | None:
    """Where a section's text ends (an index into `text`), or None while it goes on.

    Leading whitespace is not content; after the content starts, a newline ends a one-line section,
    and a following blank line or label-like line ends any section (small models ramble on past
    their first paragraph)."""
    start = len(text) - len(text.lstrip())
    if start == len(text):
        return None
    i = text.find("\n", start)
    while i != -1:
        if one_line:
            return i
        rest = text[i + 1:]
        line = rest.split("\n", 1)[0]
        if "\n" in rest and not line.strip():
            return i
        if line.strip() and looks_like_label(line):
            return i
        i = text.find("\n", i + 1)
    return None


@dataclass
class Guided:
    text: str                # the labelled reply
    generated: int           # tokens the model generated (all of them, kept or not)
    label_tokens: int        # tokens we supplied (the labels)


def guided_reply(step: Stepper, tokenizer: Any, prompt: list[int], sections: list[str], *, max_tokens: int,
                 temperature: float, eos: set[int]) -> Guided:
    """Generate `sections` in order under labels we write; at most `max_tokens` generated in all."""
    text, generated, label_tokens = "", 0, 0
    budget = max_tokens
    for n, name in enumerate(sections):
        left = len(sections) - n
        final = left == 1
        head = ("\n" if text else "") + LABELS[name] + "\n"
        # The reply so far is text (a spelled-out "<|im_end|>" in it stays text), as in the prompt.
        before = len(text_ids(tokenizer, text)) if text else 0
        text += head
        context = text_ids(tokenizer, text)
        label_tokens += len(context) - before
        step.sync(prompt + context)
        cap = budget if final else max(1, budget // left)
        if name == "question":
            cap = min(cap, QUESTION_CAP)
        out: list[int] = []
        piece = ""
        used = 0
        while used < cap:
            token = step.pick(temperature)
            used += 1
            if token in eos:
                break
            out.append(token)
            piece = tokenizer.decode(out, skip_special_tokens=True)
            end = section_end(piece, one_line=name == "question")
            if end is not None:
                piece = piece[:end]
                break
            step.push(token)
        generated += used
        budget = max(0, budget - used)
        text += piece.strip()
    return Guided(text=text, generated=generated, label_tokens=label_tokens)


def free_reply(step: Stepper, tokenizer: Any, prompt: list[int], *, max_tokens: int, temperature: float,
               eos: set[int], stop: str | None = None) -> Guided:
    """Plain generation until EOS, `stop` (a string) or `max_tokens`."""
    step.sync(prompt)
    out: list[int] = []
    text = ""
    for _ in range(max_tokens):
        token = step.pick(temperature)
        if token in eos:
            return Guided(text=text, generated=len(out) + 1, label_tokens=0)
        out.append(token)
        text = tokenizer.decode(out, skip_special_tokens=True)
        if stop and stop in text:
            return Guided(text=text[: text.index(stop)], generated=len(out), label_tokens=0)
        step.push(token)
    return Guided(text=text, generated=len(out), label_tokens=0)


class Decoder:
    """A causal LM and its KV cache: `sync(ids)` makes `ids` the context (reusing the cached common
    prefix), `pick` chooses the next token (greedy at temperature 0, else sampled with top-p 0.95),
    `push(token)` appends it. Once `stop` (an event) is set, the next feed raises llm.Stopped."""

    def __init__(self, model: Any):
        import inspect

        self.model = model
        self.stop: Any = None
        self.ids: list[int] = []     # tokens in the cache; `logits` follow the last one
        self.cache: Any = None
        self.logits: Any = None
        # transformers 5.2x renamed `past_key_values` to `cache` (the old name still works, with a warning).
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    def _feed(self, ids: list[int]) -> None:
        import torch

        if self.stop is not None and self.stop.is_set():
            from persllm_cli.core.errors import Stopped

            raise Stopped
        device = getattr(self.model, "device", None) or next(self.model.parameters()).device
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([ids], device=device), use_cache=True, logits_to_keep=1,
                             **{self._cache_arg: self.cache})
        cache = getattr(out, "cache", None)
        self.cache = cache if cache is not None else out.past_key_values
        self.logits = out.logits[0, -1].float()
        self.ids += ids

    def sync(self, ids: list[int]) -> None:
        common = 0
        for a, b in zip(ids, self.ids):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)   # the last token is fed again so its logits are fresh
        if self.cache is not None and common < len(self.ids):
            if common == 0:
                self.cache = None
            else:  # a negative count removes that many tokens, in old and new transformers alike
                self.cache.crop(common - len(self.ids))
            self.ids = self.ids[:common]
        self._feed(ids[common:])

    def pick(self, temperature: float) -> int:
        import torch

        if temperature <= 0:
            return int(torch.argmax(self.logits))
        probs = torch.softmax(self.logits / temperature, dim=-1)
        ordered, index = torch.sort(probs, descending=True)
        keep = torch.cumsum(ordered, dim=-1) - ordered < 0.95
        ordered = ordered * keep
        return int(index[torch.multinomial(ordered / ordered.sum(), 1)])

    def push(self, token: int) -> None:
        self._feed([token])

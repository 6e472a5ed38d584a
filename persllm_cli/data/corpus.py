"""Reading a persona's material: data/<stage>/knowledge.txt and style.txt.

One paragraph per line; blank lines are ignored; a leading speaker label such as `[Harry]` or
`哈利】` (the original data's format) is dropped. Line numbers are 1-based positions in the file,
so records can point back at their seed paragraph.
"""

from __future__ import annotations

import re

from dataclasses import dataclass
from pathlib import Path

from persllm_cli.core.errors import PersllmError
from persllm_cli.data.store import read_text

_LABEL_MAX = 40  # a label longer than this is prose that happens to contain a bracket


@dataclass(frozen=True)
class Paragraph:
    line: int
    text: str


def strip_label(line: str) -> str:
    s = line.strip()
    if s[:1] in ("[", "【"):
        for close in ("]", "】"):
            j = s.find(close)
            if 0 < j <= _LABEL_MAX:
                return s[j + 1:].strip()
        return s
    j = s.find("】")
    if 0 < j <= _LABEL_MAX:
        return s[j + 1:].strip()
    return s


def as_line(text: str, label: str) -> str:
    """A paragraph as one line of a material file that `read_paragraphs` reads back unchanged: its
    lines joined by spaces, and a bracket at its start that `strip_label` would drop as a speaker
    label kept by putting a real label, `[label]`, in front of it."""
    line = " ".join(part.strip() for part in text.splitlines() if part.strip())
    return line if strip_label(line) == line else f"[{label}] {line}"


def read_paragraphs(path: Path, *, required: bool = True) -> list[Paragraph]:
    """The paragraphs of a material file. Missing/non-UTF-8/empty files are a clear error when required."""
    text = read_text(path, required=required)
    if text is None:
        return []
    out = []
    for i, line in enumerate(text.splitlines(), start=1):
        t = strip_label(line)
        if t:
            out.append(Paragraph(i, t))
    if required and not out:
        raise PersllmError(f"{path}: no paragraphs (the file is empty; put one paragraph per line)")
    return out


def count_words(text: str) -> int:
    """Words for context budgets: whitespace-separated words, with each CJK character counted as one."""
    if not _ANY_CJK.search(text):
        return len(text.split())   # the common case, without looking at every character
    n = 0
    for token in text.split():
        cjk = sum(1 for ch in token if _is_cjk(ch))
        rest = "".join(" " if _is_cjk(ch) else ch for ch in token).split()
        n += cjk + len(rest)
    return n


# The characters _is_cjk counts one by one.
_ANY_CJK = re.compile("[\u4e00-\u9fff\u3400-\u4dbf\u3040-\u30ff\uac00-\ud7af\uf900-\ufaff\U00020000-\U0002fa1f]")


def _is_cjk(ch: str) -> bool:
    o = ord(ch)
    return (0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF or 0x3040 <= o <= 0x30FF
            or 0xAC00 <= o <= 0xD7AF or 0xF900 <= o <= 0xFAFF or 0x20000 <= o <= 0x2FA1F)

"""Terms of a persona's material, and the stage each term first appears in.

A term is a word of at least four letters or digits, lowercased, that is not an English stop word;
in text written without spaces (Chinese, Japanese), every pair of neighbouring CJK characters is a
term instead (a single character is too common to mean anything). The stages come in chronological
order, so "new at stage t" means: in t's material and in no earlier stage's.

Two users: eval's judge-free leak check (a name new at a later stage, found in an answer given at an
earlier one: `first_stage`) and train's start for the time-token rows (the terms only one stage has:
`own_terms`). For the leak check only *names* count: words the material writes with a capital letter
inside a sentence (people, places, spells, events), and in scripts without capitals the character
pairs its stage's material uses at least twice. Plain words are no sign of knowing the future: on the
example persona, with every word counted, 88% of the test set's own early answers held a word that
first appears in later material ("said", "walk"); with names only, none did.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from typing import Iterable, Mapping

_WORD = re.compile(r"[^\W\d_]+|\d+", re.UNICODE)
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")  # scripts without spaces
_SENTENCE = re.compile(r"(?<=[.!?。！？])\s*|\n+")
MIN_CHARS = 4


@functools.cache
def _stop_words() -> frozenset[str]:
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS   # imported on first use: sklearn is slow to load

    return frozenset(ENGLISH_STOP_WORDS)


def term_list(text: str) -> list[str]:
    """The terms of `text` in order, repeats kept."""
    stop = _stop_words()
    out: list[str] = []
    for w in _WORD.findall(text.lower()):
        if _CJK.search(w):
            run = ""
            for ch in w + " ":  # CJK runs become neighbouring pairs; other letters inside stay words
                if _CJK.match(ch):
                    run += ch
                    continue
                out.extend(run[i:i + 2] for i in range(len(run) - 1))
                run = ""
            rest = "".join(" " if _CJK.match(ch) else ch for ch in w).split()
            out.extend(r for r in rest if len(r) >= MIN_CHARS and r not in stop)
        elif len(w) >= MIN_CHARS and w not in stop:
            out.append(w)
    return out


def terms(text: str) -> set[str]:
    return set(term_list(text))


def names(text: str) -> set[str]:
    """Words (lowercased, as terms) that `text` writes with a capital letter after a sentence's first word."""
    out: set[str] = set()
    for sentence in _SENTENCE.split(text):
        for w in _WORD.findall(sentence)[1:]:
            if w[:1].isupper() and len(w) >= MIN_CHARS:
                out.add(w.lower())
    return out


def first_stage(material: Mapping[str, Iterable[str]]) -> dict[str, str]:
    """name -> the earliest stage whose material holds it (see the module docstring for what a name
    is); `material` maps stage id -> texts, in chronological order."""
    texts = {stage: list(t) for stage, t in material.items()}
    capitalised = set().union(*(names(t) for ts in texts.values() for t in ts)) if texts else set()
    seen: dict[str, str] = {}
    for stage, ts in texts.items():
        counts = Counter(t for text in ts for t in term_list(text))
        for t, n in counts.items():
            if t in seen:
                continue
            if t in capitalised or (_CJK.match(t) and n >= 2):
                seen[t] = stage
            elif not _CJK.match(t):
                seen.setdefault(t, "")      # a plain word: known from here on, but no name
    return {t: st for t, st in seen.items() if st}


def own_terms(material: Mapping[str, Iterable[str]], stage: str, limit: int) -> list[str]:
    """Up to `limit` terms that only `stage`'s material holds (no other stage, earlier or later),
    the most frequent first (ties alphabetical, so the list is the same on every run)."""
    counts: dict[str, Counter[str]] = {st: Counter(t for text in texts for t in term_list(text))
                                       for st, texts in material.items()}
    mine = counts.get(stage, Counter())
    others = set().union(*(set(c) for st, c in counts.items() if st != stage)) if len(counts) > 1 else set()
    ranked = sorted((t for t in mine if t not in others), key=lambda t: (-mine[t], t))
    return ranked[:limit]


def future_terms(answer: str, asked: str, order: list[str], first: Mapping[str, str],
                 question: str = "") -> dict[str, list[str]]:
    """Terms of `answer`, given at stage `asked`, that first appear at a later stage: later stage ->
    sorted terms. Terms the question itself holds are left out (echoing the question is not
    knowing the future)."""
    if asked not in order:
        return {}
    at = order.index(asked)
    echoed = terms(question)
    found: dict[str, list[str]] = {}
    for t in sorted(terms(answer) - echoed):
        st = first.get(t)
        if st is not None and st in order and order.index(st) > at:
            found.setdefault(st, []).append(t)
    return found

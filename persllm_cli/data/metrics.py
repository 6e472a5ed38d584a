"""Text metrics for `persllm eval`: distinction (BLEU between answers) and reference overlap.

Distinction, as in the PersLLM paper: sentence BLEU between two answers measures how much they
share wording. A persona's answers at one stage should resemble each other (intra), resemble its
answers at other stages less (cross-stage) and another persona's answers least (cross-persona).

How pairs are formed and averaged (deterministic for a seed):

- Every answer is tokenised once (see `choose_tokenize`); BLEU then runs on the tokens.
- A pair {a, b} scores the mean of sentence BLEU(a | b) and BLEU(b | a), so the score does not
  depend on which answer came first (sentence BLEU alone is not symmetric: its brevity penalty
  and n-gram precisions are taken from the hypothesis side).
- Groups:
    intra         one group per stage s: unordered pairs of two different answers of stage s;
    cross-stage   one group per pair of stages s < t: pairs (an answer of s, an answer of t);
    cross-persona one group per other persona Q: pairs (an answer of this system, an answer of Q).
  A group with more candidate pairs than `max_pairs` is replaced by a sample of `max_pairs`
  distinct pairs drawn with `random.Random(f"{seed}|{group}")`, so adding a group never changes
  another group's sample.
- A group's score is the mean over its pairs; a metric is the unweighted mean over its groups
  (macro average: a stage with many answers does not outweigh one with few). Groups without a
  single pair are left out; a metric with no group is None.

Reference overlap: corpus BLEU of the answers against the test set's reference answers, and the
mean ROUGE-L F1 (longest common subsequence of tokens, beta = 1, lowercased), both on 0-100.
"""

from __future__ import annotations

import random
import unicodedata
from dataclasses import dataclass
from itertools import combinations
from statistics import fmean
from typing import Callable, Sequence

TOKENIZE_CHOICES = ("auto", "13a", "zh", "char", "intl")


def _script(ch: str) -> str | None:
    """'han' for Chinese characters, 'kana'/'hangul' for the other scripts written without spaces."""
    o = ord(ch)
    if 0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF or 0x20000 <= o <= 0x2FA1F or 0xF900 <= o <= 0xFAFF:
        return "han"
    if 0x3040 <= o <= 0x30FF or 0x31F0 <= o <= 0x31FF or 0xFF66 <= o <= 0xFF9F:
        return "kana"
    if 0xAC00 <= o <= 0xD7AF or 0x1100 <= o <= 0x11FF or 0x3130 <= o <= 0x318F:
        return "hangul"
    return None


def choose_tokenize(texts: Sequence[str]) -> str:
    """The sacrebleu tokenizer for this material: '13a' for space-separated languages, 'zh' for
    Chinese (each Han character a token, other text as 13a), 'char' when kana or hangul appear
    (sacrebleu's 'zh' leaves those in runs). CJK counts when it is at least 10% of the letters."""
    counts = {"han": 0, "kana": 0, "hangul": 0}
    letters = 0
    for text in texts:
        for ch in text:
            if ch.isalpha():
                letters += 1
                s = _script(ch)
                if s:
                    counts[s] += 1
    cjk = sum(counts.values())
    if not letters or cjk < 0.1 * letters:
        return "13a"
    if counts["kana"] + counts["hangul"] > 0.1 * cjk:
        return "char"
    return "zh"


def tokenizer(name: str) -> Callable[[str], list[str]]:
    """A function text -> tokens using sacrebleu's tokenizer `name` ('13a', 'zh', 'char', 'intl')."""
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a
    from sacrebleu.tokenizers.tokenizer_char import TokenizerChar
    from sacrebleu.tokenizers.tokenizer_intl import TokenizerV14International
    from sacrebleu.tokenizers.tokenizer_zh import TokenizerZh

    classes = {"13a": Tokenizer13a, "zh": TokenizerZh, "char": TokenizerChar, "intl": TokenizerV14International}
    if name not in classes:
        raise ValueError(f"unknown tokenizer {name!r}")
    tok = classes[name]()
    return lambda text: tok(unicodedata.normalize("NFC", text.strip())).split()


# ---------------------------------------------------------------- BLEU


def _bleu():
    from sacrebleu.metrics import BLEU

    # Texts arrive tokenised (tokens joined by spaces), so sacrebleu must not tokenise again.
    return BLEU(tokenize="none", effective_order=True)


def sentence_bleu(hyp: list[str], ref: list[str]) -> float:
    """Smoothed sentence BLEU (sacrebleu defaults: exp smoothing, effective order) of token lists."""
    if not hyp or not ref:
        return 0.0
    return min(100.0, _bleu().sentence_score(" ".join(hyp), [" ".join(ref)]).score)


def pair_bleu(a: list[str], b: list[str], bleu=None) -> float:
    """Symmetric BLEU of two answers: the mean of both directions."""
    bleu = bleu or _bleu()
    if not a or not b:
        return 0.0
    x, y = " ".join(a), " ".join(b)
    score = (bleu.sentence_score(x, [y]).score + bleu.sentence_score(y, [x]).score) / 2
    return min(100.0, score)


def corpus_bleu(hyps: list[list[str]], refs: list[list[str]]) -> float | None:
    """Corpus BLEU of hypotheses against one reference each, or None with no pair."""
    if not hyps:
        return None
    from sacrebleu.metrics import BLEU

    score = BLEU(tokenize="none").corpus_score([" ".join(h) for h in hyps], [[" ".join(r) for r in refs]]).score
    return min(100.0, score)


# ---------------------------------------------------------------- ROUGE-L


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token sequences.

    Bit-parallel (Allison-Dix / Hyyrö): one bit per token of `a`, one big-integer step per token
    of `b`, so long answers cost O(len(a) * len(b) / 64) instead of a Python-level table.
    """
    if not a or not b:
        return 0
    masks: dict[str, int] = {}
    for i, tok in enumerate(a):
        masks[tok] = masks.get(tok, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for tok in b:
        u = v & masks.get(tok, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def rouge_l(hyp: Sequence[str], ref: Sequence[str]) -> float:
    """ROUGE-L F1 (beta = 1) of two token lists, case-insensitive, on 0-100."""
    h = [t.lower() for t in hyp]
    r = [t.lower() for t in ref]
    lcs = lcs_length(h, r)
    if lcs == 0:
        return 0.0
    p, rec = lcs / len(h), lcs / len(r)
    return 100.0 * 2 * p * rec / (p + rec)


# ---------------------------------------------------------------- pairs


def sample_pairs(n: int, m: int | None, cap: int, rng: random.Random) -> list[tuple[int, int]]:
    """Index pairs for a group: within one list of n items (m None: i < j) or across two lists
    (n x m). All pairs when there are at most `cap`, else `cap` distinct pairs drawn from `rng`,
    returned sorted."""
    total = n * (n - 1) // 2 if m is None else n * m
    if total <= cap:
        if m is None:
            return list(combinations(range(n), 2))
        return [(i, j) for i in range(n) for j in range(m)]
    chosen: set[tuple[int, int]] = set()
    while len(chosen) < cap:
        if m is None:
            i, j = rng.randrange(n), rng.randrange(n)
            if i == j:
                continue
            chosen.add((min(i, j), max(i, j)))
        else:
            chosen.add((rng.randrange(n), rng.randrange(m)))
    return sorted(chosen)


@dataclass
class Group:
    name: str          # "early", "early|late", "Hermione Granger"
    pairs: int
    score: float | None


def group_score(name: str, left: list[list[str]], right: list[list[str]] | None, cap: int, seed: int) -> Group:
    """Mean pair BLEU of one group (right None: pairs within `left`)."""
    rng = random.Random(f"{seed}|{name}")
    idx = sample_pairs(len(left), None if right is None else len(right), cap, rng)
    other = left if right is None else right
    bleu = _bleu()
    scores = [pair_bleu(left[i], other[j], bleu) for i, j in idx]
    return Group(name, len(scores), fmean(scores) if scores else None)


def macro(groups: list[Group]) -> float | None:
    scores = [g.score for g in groups if g.score is not None]
    return fmean(scores) if scores else None


def distinction(by_stage: dict[str, list[list[str]]], others: dict[str, list[list[str]]],
                cap: int = 2000, seed: int = 0) -> dict[str, object]:
    """Intra, cross-stage and cross-persona BLEU for one system.

    `by_stage`: this system's tokenised answers per stage id (in chronological order);
    `others`: tokenised answers of each other persona. Returns the three macro averages and the
    groups behind them (see the module docstring for the exact rules)."""
    stages = list(by_stage)
    intra = [group_score(s, by_stage[s], None, cap, seed) for s in stages]
    cross_stage = [group_score(f"{s}|{t}", by_stage[s], by_stage[t], cap, seed) for s, t in combinations(stages, 2)]
    mine = [a for s in stages for a in by_stage[s]]
    cross_persona = [group_score(name, mine, answers, cap, seed) for name, answers in sorted(others.items())]
    return {
        "intra": macro(intra),
        "cross_stage": macro(cross_stage),
        "cross_persona": macro(cross_persona),
        "groups": {
            "intra": [g.__dict__ for g in intra],
            "cross_stage": [g.__dict__ for g in cross_stage],
            "cross_persona": [g.__dict__ for g in cross_persona],
        },
    }


def reference_overlap(answers: list[list[str]], references: list[list[str]]) -> dict[str, float | None]:
    """Corpus BLEU and mean ROUGE-L F1 of answers against their references (same order)."""
    assert len(answers) == len(references)
    return {
        "bleu": corpus_bleu(answers, references),
        "rouge_l": fmean(rouge_l(a, r) for a, r in zip(answers, references)) if answers else None,
        "items": len(answers),
    }

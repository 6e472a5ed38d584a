"""Index.contexts (a stage's items at once) chooses exactly what the one-query-at-a-time rule
chooses: most similar first, ties in file order, the seed first, passing over what would not fit."""

from __future__ import annotations

import random

import pytest

from persllm_cli.data import retrieval
from persllm_cli.data.corpus import Paragraph
from persllm_cli.data.retrieval import Index

WORDS = "owl broom wand cloak forest train lake castle snitch potion map egg 魔法 霍格沃茨 x".split()


def by_the_rule(idx: Index, query: str, budget: int, first: int | None) -> list[int]:
    """The rule written plainly: sort everything, walk it."""
    chosen, used = [], 0
    if first is not None and first in idx._by_line:
        chosen.append(first)
        used = idx._words[idx._by_line[first]]
    if budget <= 0:
        return chosen
    sims = idx.similarities(query)
    for i in sorted(range(len(idx.paragraphs)), key=lambda i: (-sims[i], i)):
        line, w = idx.paragraphs[i].line, idx._words[i]
        if line == first or (used + w > budget and chosen):
            continue
        chosen.append(line)
        used += w
        if used >= budget:
            break
    return chosen


@pytest.mark.parametrize("top", [3, 128])
def test_contexts_choose_what_the_rule_chooses(monkeypatch, top):
    monkeypatch.setattr(retrieval, "TOP", top)   # 3: the part past the head is exercised too
    rng = random.Random(top)
    for _ in range(25):
        texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30))) for _ in range(rng.randint(1, 40))]
        texts += texts[:4]                                         # equal texts: ties
        idx = Index([Paragraph(i + 1, t) for i, t in enumerate(texts)])
        queries = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 8))) for _ in range(10)] + texts
        firsts = [rng.choice([None, rng.randint(0, 50)]) for _ in queries]
        for budget in (0, 1, 7, 40, 10_000):
            got = idx.contexts(queries, budget, firsts, block=6)
            assert got == [by_the_rule(idx, q, budget, f) for q, f in zip(queries, firsts)], budget

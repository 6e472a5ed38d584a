"""Context for a seed paragraph: the most similar paragraphs of a file, within a word budget.

    index = Index(paragraphs, get_embedder("tfidf"))
    lines = index.context(seed_text, budget_words=1500, first=seed_line)   # [12, 40, 41, ...]
    text = index.text(lines)

Budgets are counted with corpus.count_words (a CJK character is a word), never guessed. The seed
paragraph (when it is in this file) comes first, then the others by cosine similarity to the
query; a paragraph that would pass the budget is passed over and smaller ones may still fit.
"""

from __future__ import annotations

from typing import Any

from persllm_cli.data.corpus import Paragraph, count_words
from persllm_cli.data.embedding import Embedder, get_embedder


class Index:
    """Paragraphs of one file, embedded once, queried by text."""

    def __init__(self, paragraphs: list[Paragraph], embedder: Embedder | str = "tfidf"):
        self.paragraphs = list(paragraphs)
        self.embedder = get_embedder(embedder) if isinstance(embedder, str) else embedder
        self._by_line = {p.line: i for i, p in enumerate(self.paragraphs)}
        self._words = [count_words(p.text) for p in self.paragraphs]
        self._vectors: Any = None
        if self.paragraphs:
            texts = [p.text for p in self.paragraphs]
            self._vectors = self.embedder.fit(texts).transform(texts)

    def similarities(self, query: str) -> list[float]:
        """Cosine similarity of `query` to every paragraph, in file order."""
        if self._vectors is None:
            return []
        q = self.embedder.transform([query])
        sims = self._vectors @ q.T
        if hasattr(sims, "toarray"):
            sims = sims.toarray()
        return [float(x) for x in sims.ravel()]

    def context(self, query: str, budget_words: int, first: int | None = None) -> list[int]:
        """Line numbers for `query`: `first` (a line of this file) always leads, then the most
        similar paragraphs while they fit in `budget_words` (without `first`, the most similar
        one comes even when it alone passes the budget). Ties keep file order."""
        if not self.paragraphs:
            return []
        chosen: list[int] = []
        used = 0
        if first is not None and first in self._by_line:
            chosen.append(first)
            used = self._words[self._by_line[first]]
        if budget_words <= 0:
            return chosen
        sims = self.similarities(query)
        order = sorted(range(len(self.paragraphs)), key=lambda i: (-sims[i], i))
        for i in order:
            line = self.paragraphs[i].line
            if line == first:
                continue
            w = self._words[i]
            if used + w > budget_words and chosen:
                continue  # the best match always comes, even alone over the budget
            chosen.append(line)
            used += w
            if used >= budget_words:
                break
        return chosen

    def text(self, lines: list[int]) -> list[str]:
        """The paragraphs' texts for these line numbers, in the given order."""
        return [self.paragraphs[self._by_line[ln]].text for ln in lines]

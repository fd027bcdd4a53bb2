"""Top-K expressed genes per cell over a CSR matrix, in chunks, with per-cell matrix stats.

Order: descending expression, ties broken by gene name (ascending). Only positive values
count as expressed, so a cell with fewer than K expressed genes lists only those. The
kernel also reports, per cell, the minimum stored value and the number of non-finite
values, so one pass over the matrix feeds both the cells table and the validation suite.

How the kernel is fast (and still exact):

* Values are handled as their IEEE bit patterns (an integer view of the data): for
  positive floats the bit pattern orders like the value, so a candidate's sort key is one
  int64, ``value_bits << 32 | (2**31 - 1 - name_rank)`` for float32 data (unique per gene,
  larger = earlier). float64 data keys on its 64 value bits and breaks ties on the rank.
* Per row, a vectorised pass computes the stats (an order-preserving integer map of the
  bits gives the minimum; ``abs bits >= inf bits`` flags NaN/inf) and streams the row in.
* A branch-free pass then collects the positions of values at or above a threshold
  guessed from the previous row's K-th value. If fewer than K expressed genes clear it,
  the row is rescanned with a lower threshold, down to "every positive value", so the
  guess only affects speed. Every value below the final threshold has at least K better
  candidates, so it cannot be in the top K.
* If many candidates remain, a quickselect cuts them to K; the survivors are ordered by
  counting, for each, how many candidates beat it (a branch-free O(c^2) loop that the
  compiler vectorises), which writes each gene straight to its output slot.
* Rows are processed in blocks under ``prange``; each block allocates its scratch once.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numba
import numpy as np
import scipy.sparse as sp

# Per-dtype constants: (bits dtype, key shift, rank mask, mantissa bits, inf bits, sign shift, abs mask, max key)
_F32 = (np.int32, 32, 0x7FFFFFFF, 23, 0x7F800000, 31, 0x7FFFFFFF, 0x7FFFFFFF)
_F64 = (np.int64, 0, 0, 52, 0x7FF0000000000000, 63, 0x7FFFFFFFFFFFFFFF, 0x7FFFFFFFFFFFFFFF)


@numba.njit(cache=True, nogil=True, inline="always")
def _better(k1, s1, k2, s2, tie):
    """Does candidate 1 come before candidate 2 (key desc, then rank asc where keys tie)?"""
    if tie is None:
        return k1 > k2
    else:
        return k1 > k2 or (k1 == k2 and s1 < s2)


@numba.njit(cache=True, nogil=True)
def _select(keys, sec, n, k, tie):
    """Reorder keys/sec[:n] in place so that [:k] holds the k best (Hoare/Wirth selection)."""
    kk = k - 1
    lo = 0
    hi = n - 1
    while lo < hi:
        a = lo
        b = (lo + hi) >> 1
        c = hi
        if _better(keys[b], sec[b], keys[a], sec[a], tie):
            a, b = b, a
        if _better(keys[c], sec[c], keys[b], sec[b], tie):
            b, c = c, b
            if _better(keys[b], sec[b], keys[a], sec[a], tie):
                a, b = b, a
        pk = keys[b]
        ps = sec[b]
        i = lo
        j = hi
        while i <= j:
            while _better(keys[i], sec[i], pk, ps, tie):
                i += 1
            while _better(pk, ps, keys[j], sec[j], tie):
                j -= 1
            if i <= j:
                t = keys[i]
                keys[i] = keys[j]
                keys[j] = t
                r = sec[i]
                sec[i] = sec[j]
                sec[j] = r
                i += 1
                j -= 1
        if j < kk:
            lo = i
        if kk < i:
            hi = j


@numba.njit(cache=True, nogil=True)
def _place(keys, sec, c, k, k2, order, out_row, tie):
    """Write the genes of the best min(c, k) candidates to out_row (pre-filled with -1) in order.

    A candidate's slot is the number of candidates that beat it (a branch-free loop the
    compiler vectorises). Returns the k-th key, or -1 if two candidates were equal (only
    possible with duplicate column entries in a row), which left a hole; the caller then
    uses _place_dups. Also returns the (k2+1)-th best key (0 if c <= k2), which steers the next
    row's threshold guess.
    """
    kth = np.int64(0)
    k2th = np.int64(0)
    for a in range(c):
        ka = keys[a]
        p = 0
        if tie is None:
            for q in range(c):
                p += keys[q] > ka
        else:
            sa = sec[a]
            for q in range(c):
                p += (keys[q] > ka) | ((keys[q] == ka) & (sec[q] < sa))
        if p < k:
            out_row[p] = order[sec[a]]
            if p == k - 1:
                kth = ka
        elif p == k2:
            k2th = ka
    for q in range(min(c, k)):
        if out_row[q] < 0:
            return np.int64(-1), k2th
    return kth, k2th


@numba.njit(cache=True, nogil=True)
def _place_dups(keys, sec, c, k, order, out_row, tie):
    """_place for candidates that may be equal: equal ones are told apart by position."""
    kth = np.int64(0)
    for a in range(c):
        ka = keys[a]
        sa = sec[a]
        p = 0
        for q in range(c):
            if _better(keys[q], sec[q], ka, sa, tie) or (q < a and keys[q] == ka and sec[q] == sa):
                p += 1
        if p < k:
            out_row[p] = order[sa]
            if p == k - 1:
                kth = ka
    return kth


@numba.njit(cache=True, nogil=True)
def _rows(bits, indices, indptr, rk, order, k, cst, r0, r1, pos, keys, sec, out, vmin_bits, nonfinite, n_expr, tie):
    shift, lowmask, mant, infb, sh, absmask, maxkey = cst[0], cst[1], cst[2], cst[3], cst[4], cst[5], cst[6]
    ngenes = rk.shape[0]
    one = np.int64(1)
    dmin = one << (mant - 6)  # smallest guess margin (about 1% of the value)
    delta = np.int64(0)  # current guess margin, in bits
    guess = one  # threshold bits; 1 = the smallest positive value
    ema = np.int64(-1)  # running mean of the rows' k2-th value bits
    k2 = k + (k >> 1)
    for i in range(r0, r1):
        lo = np.uint64(indptr[i])
        hi = np.uint64(indptr[i + 1])
        # stats (vectorised): min over finite values via an order-preserving int map, non-finite count,
        # index range (also streams the row's indices into cache for the passes below)
        mn = maxkey
        bad = 0
        imin = 0
        imax = 0
        for j in range(lo, hi):
            b = bits[j]
            fin = (b & absmask) < infb
            kb = b ^ ((b >> sh) & absmask)
            mn = min(mn, kb if fin else maxkey)
            bad += not fin
            g = indices[j]
            imin = min(imin, g)
            imax = max(imax, g)
        nonfinite[i] = bad
        vmin_bits[i] = (mn ^ ((mn >> sh) & absmask)) if bad < np.int64(hi - lo) else 0
        if hi > lo and (imin < 0 or imax >= ngenes):
            n_expr[i] = -1
            continue
        tb = guess
        while True:
            # positions of values in [tb, inf) (branch-free), then their keys, dropping excluded genes
            span = np.uint64(infb - tb)
            n = 0
            for j in range(lo, hi):
                pos[n] = j
                n += np.uint64(np.int64(bits[j]) - tb) < span
            c = 0
            for q in range(n):
                j = pos[q]
                b = np.int64(bits[j])
                r = rk[indices[j]]
                keys[c] = (b << shift) | ((lowmask - r) & lowmask)
                sec[c] = r
                c += r >= 0
            if c >= k or tb == 1:
                break
            # the guess was too high for this row (or the row has < k expressed genes): rescan
            # once a bit lower (about x0.84), then with every positive value; guess lower from now on
            if tb == guess:
                delta = min(max(delta * 2, dmin), one << (mant + 3))
                tb = max(one, tb - (one << (mant - 2)))
            else:
                tb = one
        if c > 2 * k:
            _select(keys, sec, c, k, tie)
            c = k
            if tb > 1:
                delta -= delta >> 2  # the guess was needlessly low
        kth, k2th = _place(keys, sec, c, k, k2, order, out[i], tie)
        if kth < 0:
            kth = _place_dups(keys, sec, c, k, order, out[i], tie)
        c = min(c, k)
        n_expr[i] = c
        if c == k:
            # aim the next row's threshold at about k2 candidates
            tk = (k2th >> shift) if k2th > 0 else (kth >> shift)
            ema = tk if ema < 0 else ema + ((tk - ema) >> 2)
            guess = max(one, ema - delta)
            delta -= delta >> 4


@numba.njit(cache=True, parallel=True, nogil=True)
def _topk_csr(bits, indices, indptr, rk, order, k, cst, out, vmin_bits, nonfinite, n_expr, block, cap, tie):
    n = out.shape[0]
    nb = (n + block - 1) // block
    for b in numba.prange(nb):
        pos = np.empty(cap, dtype=np.int64)
        keys = np.empty(cap, dtype=np.int64)
        sec = np.empty(cap, dtype=np.int32)
        r0 = b * block
        r1 = min(n, r0 + block)
        _rows(bits, indices, indptr, rk, order, k, cst, r0, r1, pos, keys, sec, out, vmin_bits, nonfinite, n_expr, tie)


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
        # rank of each kept gene (-1: excluded) and the gene of each rank
        self._rk = np.where(self.keep, self.ranks, -1).astype(np.int32)
        self._order = np.argsort(self.ranks).astype(np.int32)

    def __call__(self, chunk) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Top-K gene indices (rows x k, -1 padded) and per-row stats of a CSR (or dense) chunk."""
        m = chunk if sp.issparse(chunk) else sp.csr_matrix(np.asarray(chunk))
        if m.format != "csr":
            m = m.tocsr()
        n = m.shape[0]
        data = m.data
        if data.dtype not in (np.float32, np.float64):
            # exact widening: small ints and float16 fit float32, the rest go to float64
            small = data.dtype.kind == "b" or data.dtype.itemsize <= 2
            data = data.astype(np.float32 if small else np.float64)
        dt, *cst = _F32 if data.dtype == np.float32 else _F64
        data = np.ascontiguousarray(data)
        bits = data.view(dt)
        indices = np.ascontiguousarray(m.indices)
        indptr = np.ascontiguousarray(m.indptr)
        out = np.full((n, self.k), -1, dtype=np.int32)
        vmin = np.zeros(n, dtype=data.dtype)
        nonfinite = np.zeros(n, dtype=np.int64)
        n_expr = np.zeros(n, dtype=np.int64)
        if n:
            cap = max(1, int(np.diff(indptr).max()))
            block = max(16, -(-n // (4 * numba.get_num_threads())))
            _topk_csr(bits, indices, indptr, self._rk, self._order, self.k, np.array(cst, dtype=np.int64),
                      out, vmin.view(dt), nonfinite, n_expr, block, cap, None if dt is np.int32 else 1)
            if (n_expr < 0).any():
                raise ValueError("sparse matrix has column indices outside [0, n_genes)")
        stats = {"min_value": vmin.astype(np.float64), "n_nonfinite": nonfinite, "n_expressed": n_expr}
        return out, stats


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

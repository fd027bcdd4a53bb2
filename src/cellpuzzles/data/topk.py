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
  bits gives the minimum; ``abs bits >= inf bits`` flags NaN/inf) and checks the indices.
* A threshold search then counts the values at or above a threshold with one vector compare
  per 64 values into a bit mask and a popcount (``llvm_ops.mask64``). It starts from a running
  estimate of the rows' 1.5K-th value and moves (steps, then bisection, at most a few passes)
  until K..2K values clear it; if fewer than K expressed genes exist, every positive value is
  taken. Every value below the final threshold has at least K better ones, so it cannot be in
  the top K: the search only affects speed.
* The candidates are read off the mask's set bits; while this happens the next row's cache
  lines are prefetched, so the next row's passes find it in cache.
* float32 keys (at most 128 after a quickselect) are sorted in vector registers with a bitonic
  network (``llvm_ops.sort64_desc`` / ``sort128_desc``); the rank in the key's low bits gives
  the gene. Other cases (float64 data, or more than 128 candidates when K is large) place each
  candidate by counting, branch-free and vectorised, how many candidates beat it.
* Rows are processed in blocks under ``prange``; each block allocates its scratch once.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numba
import numpy as np
import scipy.sparse as sp

from cellpuzzles.data.llvm_ops import ctz, mask64, popcount, prefetch, sort64_desc, sort128_desc

# Per-dtype constants: (bits dtype, key shift, rank mask, mantissa bits, inf bits, sign shift, abs mask, max key)
_F32 = (np.int32, 32, 0x7FFFFFFF, 23, 0x7F800000, 31, 0x7FFFFFFF, 0x7FFFFFFF)
_F64 = (np.int64, 0, 0, 52, 0x7FF0000000000000, 63, 0x7FFFFFFFFFFFFFFF, 0x7FFFFFFFFFFFFFFF)
SEARCH_PASSES = 8  # most threshold-search passes per row before taking what the last one found


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
def _place(keys, sec, c, k, k2, order, slots, tie):
    """Write the genes of the best min(c, k) candidates to slots[:k] (pre-filled with -1) in order.

    A candidate's slot is the number of candidates that beat it: a branch-free count over the
    candidates padded to a multiple of 32 (so the vectorised loop has no scalar tail), and a
    branch-free write (slot k takes the candidates that miss the top k). Returns the k-th key,
    or -1 if two candidates were equal (only possible with duplicate column entries in a row),
    which left a hole; the caller then uses _place_dups. Also returns the (k2+1)-th best key
    (0 if c <= k2), which steers the next row's threshold.
    """
    cp = (c + 31) & ~31
    keys[c:cp] = -1
    sec[c:cp] = 0
    kth = np.int64(0)
    k2th = np.int64(0)
    for a in range(c):
        ka = keys[a]
        p = 0
        if tie is None:
            for q in range(cp):
                p += keys[q] > ka
        else:
            sa = sec[a]
            for q in range(cp):
                p += (keys[q] > ka) | ((keys[q] == ka) & (sec[q] < sa))
        slots[min(p, k)] = order[sec[a]]
        kth = ka if p == k - 1 else kth
        k2th = ka if p == k2 else k2th
    for q in range(min(c, k)):
        if slots[q] < 0:
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


@numba.njit(cache=True, nogil=True, inline="always")
def _mask_words(bits, lo, hi, tb, span, words):
    """words[w] bit t = (bits[lo + 64 w + t] - tb) < span (unsigned); returns (words used, bits set)."""
    nfull = (hi - lo) >> 6
    cnt = np.int64(0)
    for w in range(nfull):
        m = mask64(bits, lo + (w << 6), tb, span)
        words[w] = m
        cnt += popcount(m)
    base = lo + (nfull << 6)
    m = np.int64(0)
    for t in range(hi - base):
        m |= np.int64(np.uint64(np.int64(bits[base + t]) - tb) < np.uint64(span)) << t
    words[nfull] = m
    return nfull + 1, cnt + popcount(m)


@numba.njit(cache=True, nogil=True, inline="always")
def _extract(words, nw, lo, hi, bits, indices, rk, shift, lowmask, keys, sec, ahead):
    """Keys (and name ranks) of the values flagged in words, excluded genes dropped; returns how many.

    With ahead, also prefetches the next row's cache lines (the same span after hi), so they
    arrive while this row is ordered."""
    c = 0
    last = np.int64(bits.shape[0]) - 64
    for w in range(nw):
        m = words[w]
        base = lo + (w << 6)
        nxt = base + (hi - lo)
        if ahead and nxt <= last:
            for t in range(0, 64, 16):
                prefetch(bits, nxt + t)
                prefetch(indices, nxt + t)
        while m != 0:
            j = base + ctz(m)
            m &= m - 1
            b = np.int64(bits[j])
            r = rk[indices[j]]
            keys[c] = (b << shift) | ((lowmask - r) & lowmask)
            sec[c] = r
            c += r >= 0
    return c


@numba.njit(cache=True, nogil=True)
def _rows(bits, indices, indptr, rk, order, k, cst, r0, r1, words, keys, sec, slots, out, vmin_bits, nonfinite, n_expr,
          tie):
    shift, lowmask, mant, infb, sh, absmask, maxkey = cst[0], cst[1], cst[2], cst[3], cst[4], cst[5], cst[6]
    ngenes = rk.shape[0]
    one = np.int64(1)
    step0 = one << (mant - 4)  # first search step: 1/16 of an octave (about 4% of the value)
    ema = np.int64(-1)  # running mean of the rows' (k2+1)-th value bits: the next row's first threshold
    k2 = k + (k >> 1)
    cmax = 2 * k
    for i in range(r0, r1):
        lo = np.int64(indptr[i])
        hi = np.int64(indptr[i + 1])
        # stats (vectorised; unsigned loop bounds let LLVM vectorise): min over finite values via an
        # order-preserving int map, non-finite count, index range
        mn = maxkey
        bad = 0
        imin = 0
        imax = 0
        for j in range(np.uint64(lo), np.uint64(hi)):
            b = bits[j]
            fin = (b & absmask) < infb
            kb = b ^ ((b >> sh) & absmask)
            mn = min(mn, kb if fin else maxkey)
            bad += not fin
            g = indices[j]
            imin = min(imin, g)
            imax = max(imax, g)
        nonfinite[i] = bad
        vmin_bits[i] = (mn ^ ((mn >> sh) & absmask)) if bad < hi - lo else 0
        if hi > lo and (imin < 0 or imax >= ngenes):
            n_expr[i] = -1
            continue
        # threshold search on counts of values in [tb, inf): aim for k..cmax of them in a few passes
        tb = ema if ema > 0 else one
        good = np.int64(0)  # a threshold seen with more than cmax values (0: none)
        low = np.int64(0)  # a threshold seen with fewer than k values (0: none)
        step = step0
        nw, cnt = _mask_words(bits, lo, hi, tb, infb - tb, words)
        for _ in range(SEARCH_PASSES):
            if cnt < k and tb > 1:
                low = tb
                tb = good + ((low - good) >> 1) if good > 0 else max(one, tb - step)
            elif cnt > cmax and (low == 0 or low - tb > 1):
                good = tb
                tb = tb + ((low - tb) >> 1) if low > 0 else min(tb + step, infb - 1)
            else:
                break
            step *= 2
            if tb == good:
                break
            nw, cnt = _mask_words(bits, lo, hi, tb, infb - tb, words)
        if cnt < k and tb > 1:
            tb = good if good > 0 else one  # the last threshold with enough values, or all of them
            nw, cnt = _mask_words(bits, lo, hi, tb, infb - tb, words)
        c = _extract(words, nw, lo, hi, bits, indices, rk, shift, lowmask, keys, sec, True)
        tries = 0
        while c < k and tb > 1:
            # excluded genes took places: lower the threshold (twice, then to every expressed value)
            tb = max(one, tb - step) if tries < 2 else one
            step *= 4
            tries += 1
            nw, cnt = _mask_words(bits, lo, hi, tb, infb - tb, words)
            c = _extract(words, nw, lo, hi, bits, indices, rk, shift, lowmask, keys, sec, False)
        if c == 0:
            n_expr[i] = 0
            continue
        if tie is None and c > 128 and k2 < 128:
            _select(keys, sec, c, 128, tie)
            c = 128
        if tie is None and c <= 128:
            # float32 keys carry the name rank, so sorting the keys alone orders the genes
            if c <= 64:
                keys[c:64] = -1
                sort64_desc(keys)
            else:
                keys[c:128] = -1
                sort128_desc(keys)
            m = min(c, k)
            row = out[i]
            for q in range(m):
                row[q] = order[lowmask - (keys[q] & lowmask)]
            kth = keys[m - 1]
            k2th = keys[k2] if c > k2 else np.int64(0)
        else:
            if c > 4 * k:
                _select(keys, sec, c, k2 + 1, tie)
                c = k2 + 1
            slots[:] = -1
            kth, k2th = _place(keys, sec, c, k, k2, order, slots, tie)
            if kth < 0:
                slots[:] = -1
                kth = _place_dups(keys, sec, c, k, order, slots, tie)
            out[i] = slots[:k]
        c = min(c, k)
        n_expr[i] = c
        if c == k:
            tk = (k2th >> shift) if k2th > 0 else (kth >> shift)
            ema = tk if ema < 0 else ema + ((tk - ema) >> 2)


@numba.njit(cache=True, parallel=True, nogil=True)
def _topk_csr(bits, indices, indptr, rk, order, k, cst, out, vmin_bits, nonfinite, n_expr, block, cap, tie):
    n = out.shape[0]
    nb = (n + block - 1) // block
    for b in numba.prange(nb):
        words = np.empty(cap // 64 + 2, dtype=np.int64)
        keys = np.empty(max(cap, 128) + 32, dtype=np.int64)
        sec = np.empty(max(cap, 128) + 32, dtype=np.int32)
        slots = np.empty(k + 1, dtype=np.int32)
        r0 = b * block
        r1 = min(n, r0 + block)
        _rows(bits, indices, indptr, rk, order, k, cst, r0, r1, words, keys, sec, slots, out, vmin_bits, nonfinite,
              n_expr, tie)


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

"""The top-K kernel against a brute-force Python sort, on inputs built to hit its edge cases."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import scipy.sparse as sp

from cellpuzzles.data.topk import TopK, reference_top_k, top_k_genes


def brute(m, names, k, exclude=()):
    """Stored entries per row; expressed = finite, > 0, not excluded; order (-value, name)."""
    m = sp.csr_matrix(m) if not sp.issparse(m) else m.tocsr()
    pat = re.compile("|".join(f"(?:{p})" for p in exclude)) if exclude else None
    n = m.shape[0]
    out = np.full((n, k), -1, dtype=np.int32)
    vmin = np.zeros(n)
    bad = np.zeros(n, dtype=np.int64)
    n_expr = np.zeros(n, dtype=np.int64)
    for i in range(n):
        lo, hi = m.indptr[i], m.indptr[i + 1]
        vals = [float(v) for v in m.data[lo:hi]]
        cols = [int(c) for c in m.indices[lo:hi]]
        fin = [v for v in vals if math.isfinite(v)]
        vmin[i] = min(fin) if fin else 0.0
        bad[i] = len(vals) - len(fin)
        expr = [(v, c) for v, c in zip(vals, cols) if math.isfinite(v) and v > 0 and not (pat and pat.search(names[c]))]
        expr.sort(key=lambda vc: (-vc[0], names[vc[1]]))
        top = [c for _, c in expr[:k]]
        out[i, : len(top)] = top
        n_expr[i] = len(top)
    return out, {"min_value": vmin, "n_nonfinite": bad, "n_expressed": n_expr}


def gene_names(g, rng, mt=0.1):
    """Unique names whose sorted order differs from column order; some mitochondrial / ribosomal."""
    names = set()
    while len(names) < g:
        stem = "".join(rng.choice(list("ABCDEFGHKLMNPRSTZ"), size=int(rng.integers(2, 6))))
        u = rng.random()
        names.add(f"MT-{stem}" if u < mt else f"RPL{stem}" if u < 2 * mt else f"{stem}{int(rng.integers(0, 99))}")
    names = sorted(names)
    return [names[i] for i in rng.permutation(g)]


def random_csr(n, g, rng, dtype=np.float32, special=True):
    """Rows of very different lengths (empty, < k, most of the genes) and value scales; few distinct
    values (heavy ties); explicit zeros, negatives and, if special, NaN / +-inf stored."""
    lens = np.minimum(rng.choice([0, 1, 3, 8, 20, 60, g // 2, g], size=n, p=[0.05, 0.05, 0.1, 0.1, 0.2, 0.2, 0.2, 0.1]), g)
    indptr = np.concatenate([[0], np.cumsum(lens)])
    indices = np.concatenate([np.sort(rng.choice(g, size=L, replace=False)) for L in lens] + [np.zeros(0, int)])
    levels = np.array([0.0, -1.0, -0.5, 0.25, 1.0, 1.0, 2.0, 2.0, 2.0, 3.0, 3.5, 7.0])
    data = rng.choice(levels, size=len(indices))
    if special:
        s = rng.random(len(data))
        data[s < 0.03] = np.nan
        data[(s >= 0.03) & (s < 0.05)] = np.inf
        data[(s >= 0.05) & (s < 0.06)] = -np.inf
    # per-row scale: rows far apart in magnitude defeat the kernel's threshold guess
    scale = 10.0 ** rng.integers(-3, 4, size=n)
    data = data * np.repeat(scale, lens)
    return sp.csr_matrix((data.astype(dtype), indices.astype(np.int32), indptr), shape=(n, g))


def check(m, names, k, exclude=()):
    out, st = TopK(names, k, exclude)(m)
    bout, bst = brute(m, names, k, exclude)
    assert out.dtype == np.int32 and out.shape == (m.shape[0], k)
    np.testing.assert_array_equal(out, bout)
    assert st["min_value"].dtype == np.float64
    np.testing.assert_array_equal(st["min_value"], bst["min_value"])
    np.testing.assert_array_equal(st["n_nonfinite"], bst["n_nonfinite"])
    np.testing.assert_array_equal(st["n_expressed"], bst["n_expressed"])
    return out, st


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("k", [1, 7, 50])
@pytest.mark.parametrize("exclude", [(), ("^MT-",), ("^MT-", "^RP[SL]")])
def test_matches_bruteforce(dtype, k, exclude):
    rng = np.random.default_rng(k * 31 + len(exclude) + (dtype == np.float64))
    g = 150
    names = gene_names(g, rng)
    m = random_csr(400, g, rng, dtype)
    _, st = check(m, names, k, exclude)
    # the inputs did hit the edge cases
    assert (st["n_nonfinite"] > 0).any() and (st["min_value"] < 0).any()
    ne = st["n_expressed"]
    assert (ne == 0).any() and (ne == k).any() and (k == 1 or ((ne > 0) & (ne < k)).any())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_continuous_values_and_scales(dtype):
    """Few ties, smoothly varying row scales, long rows: exercises the guess, rescans and selection."""
    rng = np.random.default_rng(7)
    n, g, k = 600, 400, 20
    m = sp.random(n, g, density=0.4, format="csr", random_state=rng, dtype=np.float64)
    m.data = (m.data * np.repeat(np.exp(np.sin(np.arange(n) / 9.0) * 6), np.diff(m.indptr))).astype(dtype)
    check(m, gene_names(g, rng), k)
    # then many rows with fewer than k expressed genes after rows with many
    m2 = sp.vstack([m[:50], random_csr(200, g, rng, dtype, special=False), m[50:100]]).tocsr()
    check(m2, gene_names(g, rng), k)


def test_all_ties_break_by_name_not_column():
    names = ["delta", "alpha", "echo", "charlie", "bravo"]
    m = sp.csr_matrix(np.array([[2.0, 2.0, 2.0, 2.0, 2.0], [1.0, 3.0, 1.0, 1.0, 0.0]], dtype=np.float32))
    out, st = check(m, names, 3)
    assert out.tolist() == [[1, 4, 3], [1, 3, 0]]  # alpha bravo charlie; then 3.0 (alpha), 1.0: charlie, delta
    assert st["n_expressed"].tolist() == [3, 3]


def test_stats_and_special_values():
    data = np.array([np.nan, np.inf, -np.inf, -2.5, 0.0, 3.0, 1.0, np.nan], dtype=np.float32)
    indices = np.array([0, 1, 2, 3, 4, 5, 0, 1])
    indptr = np.array([0, 6, 6, 8])  # row 1 empty; row 2: a value and a NaN
    m = sp.csr_matrix((data, indices, indptr), shape=(3, 6))
    out, st = check(m, list("abcdef"), 4)
    assert out.tolist() == [[5, -1, -1, -1], [-1] * 4, [0, -1, -1, -1]]
    assert st["min_value"].tolist() == [-2.5, 0.0, 1.0]
    assert st["n_nonfinite"].tolist() == [3, 0, 1]
    assert st["n_expressed"].tolist() == [1, 0, 1]
    # a row of only non-finite values has min_value 0.0
    m = sp.csr_matrix((np.array([np.nan, -np.inf]), np.array([0, 1]), np.array([0, 2])), shape=(1, 3))
    out, st = check(m, ["x", "y", "z"], 2)
    assert st["min_value"].tolist() == [0.0] and st["n_nonfinite"].tolist() == [2] and out.tolist() == [[-1, -1]]


def test_explicit_zeros_are_not_expressed():
    m = sp.csr_matrix((np.zeros(3, dtype=np.float32), np.array([0, 1, 2]), np.array([0, 3])), shape=(1, 3))
    out, st = check(m, ["a", "b", "c"], 2)
    assert out.tolist() == [[-1, -1]] and st["n_expressed"].tolist() == [0] and st["min_value"].tolist() == [0.0]


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, np.int64, np.uint16])
def test_dense_and_other_dtypes(dtype):
    rng = np.random.default_rng(3)
    g = 60
    names = gene_names(g, rng)
    dense = rng.choice([0, 0, 0, 1, 2, 2, 5], size=(120, g)).astype(dtype)
    out, _ = check(dense, names, 10)
    out2, _ = TopK(names, 10)(sp.csr_matrix(dense))
    np.testing.assert_array_equal(out, out2)
    if dtype == np.float32:
        dense[0, :3] = [np.nan, np.inf, 4]
        check(dense, names, 10, ("^MT-",))
        check(sp.csc_matrix(dense), names, 10)  # other sparse formats are converted


def test_float64_ties_that_float32_would_merge():
    # distinct in float64, equal once rounded to float32: must order by value, not by name
    v = 1.0 + 2.0**-40
    m = sp.csr_matrix(np.array([[1.0, v, 1.0, v]]))
    out, _ = check(m, ["a", "b", "c", "d"], 3)
    assert out.tolist() == [[1, 3, 0]]


def test_duplicate_column_entries_count_separately():
    m = sp.csr_matrix((np.array([2.0, 2.0, 1.0, 2.0], dtype=np.float32), np.array([1, 1, 0, 2]), np.array([0, 4])), shape=(1, 3))
    out, st = check(m, ["a", "b", "c"], 3)
    assert out.tolist() == [[1, 1, 2]] and st["n_expressed"].tolist() == [3]


def test_chunked_equals_whole_and_k_larger_than_genes():
    rng = np.random.default_rng(11)
    g = 40
    names = gene_names(g, rng)
    m = random_csr(300, g, rng)
    tk = TopK(names, 60)
    whole, st = tk(m)
    parts = [tk(m[s : s + 37]) for s in range(0, 300, 37)]
    np.testing.assert_array_equal(whole, np.vstack([p[0] for p in parts]))
    for c in st:
        np.testing.assert_array_equal(st[c], np.concatenate([p[1][c] for p in parts]))
    check(m, names, 60)
    np.testing.assert_array_equal(top_k_genes(m, names, 60), whole)


def test_agrees_with_reference_value_multisets():
    rng = np.random.default_rng(5)
    g, k = 300, 25
    m = random_csr(200, g, rng, special=False)
    m.data = np.abs(m.data)
    ref = reference_top_k(m, k)
    out = top_k_genes(m, gene_names(g, rng), k)
    dense = m.toarray()
    for i in range(m.shape[0]):
        mine = out[i][out[i] >= 0]
        np.testing.assert_array_equal(np.sort(dense[i, mine]), np.sort(dense[i, ref[i]]))


def long_rows(n, g, rng, dtype, levels):
    """Long rows (hundreds of stored values each), values from a few levels (heavy ties) times a slowly
    drifting row scale: the shape of real normalised counts, where the kernel's search and sort run."""
    lens = rng.integers(g // 4, g, size=n)
    indptr = np.concatenate([[0], np.cumsum(lens)])
    indices = np.concatenate([np.sort(rng.choice(g, size=L, replace=False)) for L in lens])
    data = rng.choice(levels, size=len(indices)) * np.repeat(np.exp(rng.normal(0, 0.3, n)), lens)
    return sp.csr_matrix((data.astype(dtype), indices.astype(np.int32), indptr), shape=(n, g))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("k", [20, 50, 60, 100, 130])
def test_long_rows_every_ordering_path(dtype, k):
    """k=20/50: candidates sorted in registers (<= 64, <= 128, and > 128 cut by a quickselect);
    k=60: mostly the 128-lane sort; k=100/130: the counting placement; float64: always counting."""
    rng = np.random.default_rng(k)
    g = 700
    names = gene_names(g, rng)
    continuous = rng.lognormal(0, 1.0, 400)
    ties = np.array([1.0, 1.0, 1.0, 2.0, 2.0, 3.0, 4.0, 6.0, 9.0, 14.0, 30.0])
    for levels in (continuous, ties):
        check(long_rows(250, g, rng, dtype, levels), names, k)
    check(long_rows(150, g, rng, dtype, ties), names, k, ("^MT-", "^RP[SL]"))


def test_search_with_a_tie_group_straddling_k():
    """40 distinct high values, then 300 genes tied at one level: no threshold gives k..2k candidates,
    so the search must stop (bracket closed) and take the tie group, ordered by name."""
    rng = np.random.default_rng(2)
    g = 400
    names = gene_names(g, rng)
    rows = []
    for r in range(60):
        vals = np.full(g, 0.0)
        cols = rng.permutation(g)
        vals[cols[:40]] = 5.0 + rng.random(40) * (1 + r % 3)
        vals[cols[40:340]] = 1.0 + (r % 5) * 0.5
        rows.append(vals)
    m = sp.csr_matrix(np.array(rows, dtype=np.float32))
    for k in (39, 40, 41, 50, 64, 65, 200, 339, 340, 341):
        check(m, names, k)


def test_excluded_genes_at_the_top_of_every_row():
    """The best-expressed genes are all excluded: the threshold the counts chose leaves fewer than k
    kept genes, so the kernel lowers it (twice, then to every expressed value)."""
    rng = np.random.default_rng(4)
    g = 300
    names = [f"MT-{i}" if i < 120 else f"G{i}" for i in range(g)]
    dense = rng.random((80, g)).astype(np.float32)
    dense[:, :120] += 10.0  # excluded genes dominate
    dense[dense < 0.3] = 0
    check(sp.csr_matrix(dense), names, 50, ("^MT-",))


def test_bad_input():
    with pytest.raises(ValueError):
        TopK(["a"], 0)
    m = sp.csr_matrix((np.ones(2, dtype=np.float32), np.array([0, 5]), np.array([0, 2])), shape=(1, 6))
    with pytest.raises(ValueError, match="column indices"):
        TopK(list("abc"), 2)(_unchecked(m, 3))
    with pytest.raises(ValueError, match="column indices"):
        TopK(list("abc"), 2)(sp.csr_matrix(np.ones((2, 4), dtype=np.float32)))  # more columns than genes
    out, st = TopK(list("abc"), 2)(sp.csr_matrix((0, 3), dtype=np.float32))
    assert out.shape == (0, 2) and len(st["min_value"]) == 0


def _unchecked(m, g):
    """A CSR claiming g columns while holding a larger column index (as a corrupt file could)."""
    bad = sp.csr_matrix((1, g), dtype=np.float32)
    bad.data, bad.indices, bad.indptr = m.data, m.indices.astype(np.int32), m.indptr.astype(np.int32)
    return bad

"""The LLVM operations behind the top-K kernel, each against numpy on random and edge inputs."""

from __future__ import annotations

import numba
import numpy as np
import pytest

from cellpuzzles.data.llvm_ops import ctz, mask64, popcount, sort64_desc, sort128_desc


@numba.njit
def _sort64(x):
    sort64_desc(x)


@numba.njit
def _sort128(x):
    sort128_desc(x)


@numba.njit
def _mask(a, base, lo, span):
    return mask64(a, base, lo, span)


@numba.njit
def _bits(x):
    return ctz(x), popcount(x)


@pytest.mark.parametrize("n,fn", [(64, _sort64), (128, _sort128)])
def test_bitonic_sort_descending(n, fn):
    rng = np.random.default_rng(n)
    cases = [rng.integers(-(2**62), 2**62, n), rng.integers(0, 4, n), np.arange(n), np.arange(n)[::-1].copy(),
             np.full(n, 7), np.array([-1] * (n // 2) + list(range(n // 2)))]
    for x in cases:
        x = np.ascontiguousarray(x, dtype=np.int64)
        y = np.concatenate([x, [123, 456]])  # values past n are not touched
        fn(y)
        np.testing.assert_array_equal(y[:n], np.sort(x)[::-1])
        assert y[n:].tolist() == [123, 456]


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_mask64_matches_numpy(dtype):
    rng = np.random.default_rng(1)
    info = np.iinfo(dtype)
    a = rng.integers(info.min, info.max, 300, dtype=dtype)
    a[::7] = 5
    for base in (0, 3, 236):
        for lo, span in ((5, 1), (0, int(info.max)), (int(rng.integers(0, info.max)), int(info.max) // 3), (1, 0)):
            got = _mask(a, base, lo, span)
            want = [int((int(v) - lo) % (1 << (8 * a.itemsize)) < span) for v in a[base:base + 64]]
            assert [(got >> t) & 1 for t in range(64)] == want


def test_ctz_and_popcount():
    for x in (1, 2, 12, 1 << 40, -(1 << 63), -1, 0x5555):
        c, p = _bits(np.int64(x))
        u = x % (1 << 64)
        assert c == (u & -u).bit_length() - 1
        assert p == bin(u).count("1")

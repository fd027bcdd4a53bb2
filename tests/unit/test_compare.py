"""RL vs SFT on the same test puzzles: the paired difference and its interval."""

import pytest

from cellpuzzles.core.errors import CellPuzzlesError
from cellpuzzles.evaluation.compare import paired_difference


def record(rewards, sha="t"):
    return {"test_sha256": sha, "modes": {"constrained": {"rewards": {f"p{i}": r for i, r in enumerate(rewards)}}}}


def test_paired_difference_counts_exact_solutions_pair_by_pair():
    after = record([1.0, 1.0, 1.0, 0.5, -1.0, 1.0, 1.0, 1.0])
    before = record([1.0, 0.5, 0.0, 0.5, 1.0, 0.0, 0.5, 1.0])
    d = paired_difference(after, before, "constrained", n_boot=500)
    assert d["after"] == 0.75 and d["before"] == 0.375 and d["difference"] == 0.375 and d["n"] == 8
    assert d["ci"][0] <= 0.375 <= d["ci"][1] and d["ci"][0] > -0.2  # 4 gained, 1 lost
    same = paired_difference(after, after, "constrained", n_boot=200)
    assert same["difference"] == 0 and same["ci"] == [0.0, 0.0]


def test_paired_difference_refuses_different_test_sets():
    with pytest.raises(CellPuzzlesError, match="different test puzzles"):
        paired_difference(record([1.0], "a"), record([1.0], "b"), "constrained")

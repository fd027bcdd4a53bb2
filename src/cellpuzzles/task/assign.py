"""One-to-one assignment of cells to candidate types from a cells x candidates score matrix."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment


def assign(scores: np.ndarray) -> np.ndarray:
    """Column index for each row maximising the total score (Hungarian); a permutation.

    ``scores[i, j]`` is how well cell ``i`` fits candidate ``j`` (higher is better).
    Non-finite scores are treated as the worst possible fit.
    """
    s = np.asarray(scores, dtype=float)
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"need a square cells x candidates matrix, got shape {s.shape}")
    finite = np.isfinite(s)
    if not finite.all():
        floor = (s[finite].min() if finite.any() else 0.0) - 1e6
        s = np.where(finite, s, floor)
    rows, cols = linear_sum_assignment(s, maximize=True)
    out = np.empty(s.shape[0], dtype=int)
    out[rows] = cols
    return out


def assign_labels(scores: np.ndarray, candidates: Sequence[str]) -> list[str]:
    """The candidate label chosen for each cell, each candidate used exactly once."""
    return [candidates[j] for j in assign(scores)]

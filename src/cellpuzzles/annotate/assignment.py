"""Groups to candidate types over a groups x candidates score matrix (higher is better):
one-to-one (rectangular when candidates outnumber groups: spare candidates stay unused),
capacity=K (each candidate repeated K times as a column of the assignment) or independent
(each group its best candidate)."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from cellpuzzles.annotate.options import INDEPENDENT, Assignment
from cellpuzzles.core.errors import CellPuzzlesError


def check_fits(rule: Assignment, n_groups: int, n_candidates: int, where: str) -> None:
    """One clear line when the rule cannot place every group."""
    if rule.kind == INDEPENDENT:
        return
    room = n_candidates * rule.capacity
    if n_groups > room:
        fix = (f"give at least {n_groups} candidates or use --assignment capacity={-(-n_groups // n_candidates)} "
               "or independent")
        raise CellPuzzlesError(f"{where}: {n_groups} groups but {n_candidates} candidates hold only {room} under "
                               f"{rule.name}; {fix}")


def assign_columns(scores: np.ndarray, rule: Assignment) -> np.ndarray:
    """The candidate (column) index for each group (row) under ``rule``; non-finite scores
    count as the worst fit."""
    s = np.asarray(scores, dtype=float)
    finite = np.isfinite(s)
    if not finite.all():
        s = np.where(finite, s, (s[finite].min() if finite.any() else 0.0) - 1e6)
    if rule.kind == INDEPENDENT:
        return s.argmax(1)
    n_groups, n_cands = s.shape
    check_fits(rule, n_groups, n_cands, "assignment")
    wide = np.repeat(s, rule.capacity, axis=1)  # column c * K + k is candidate c's k-th place
    rows, cols = linear_sum_assignment(wide, maximize=True)
    out = np.empty(n_groups, dtype=int)
    out[rows] = cols // rule.capacity
    return out

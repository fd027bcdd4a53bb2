"""Uncertainty that covers what varies, and two models compared on the same test puzzles.

Test puzzles share cells (a rare type's few test cells sit in a large share of the puzzles),
so puzzles are not independent draws and a bootstrap over puzzles understates the spread.
``cell_weights`` resamples test *cells* instead: each draw takes, within every cell type, the
type's test cells with replacement (multiplicity m_c, mean 1), and weights each puzzle by the
linearised product of its cells' multiplicities, 1 + sum_c (m_c - 1) — to first order the
weight of a puzzle rebuilt from the resampled pool (the product), without the product's
collapse to zero for large N. Every metric is then a weighted mean per draw, and the 2.5/97.5
percentiles are the interval. The linearisation is conservative where puzzles share few cells
(with no cell shared at all, up to N times the variance of the puzzle bootstrap); on the bundled
data, where each test cell sits in ~15 puzzles, its width matches the spread across split seeds.
``benchmarks/interval_coverage.py`` measures how well these
intervals cover other split seeds' estimates, against the puzzle bootstrap.

The paired comparison (``paired_difference``, and the gate) uses the same weights: the mean
per-puzzle difference in exact match (the reference evaluator's rule) between two models.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cellpuzzles.core.errors import CellPuzzlesError
from cellpuzzles.task.puzzle import Puzzle
from cellpuzzles.task.reward import puzzle_weights, score

CELLS, PUZZLES = "cells", "puzzles"


def cell_weights(puzzle_cells: Sequence[Sequence[str]], puzzle_types: Sequence[Sequence[str]] | None,
                 n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, puzzles] bootstrap weights from resampling the test cells (within each type
    when ``puzzle_types`` gives every cell's type)."""
    index: dict[str, int] = {}
    ctype: dict[str, str] = {}
    for i, cells in enumerate(puzzle_cells):
        types = puzzle_types[i] if puzzle_types is not None else [""] * len(cells)
        for c, t in zip(cells, types):
            index.setdefault(c, len(index))
            ctype.setdefault(c, str(t).strip().lower())
    rng = np.random.default_rng(seed)
    m = np.zeros((n_boot, len(index)))
    by_type: dict[str, list[int]] = {}
    for c, i in index.items():
        by_type.setdefault(ctype[c], []).append(i)
    for _, cols in sorted(by_type.items()):
        m[:, cols] = rng.multinomial(len(cols), np.full(len(cols), 1.0 / len(cols)), size=n_boot)
    member = np.zeros((len(index), len(puzzle_cells)))
    for p, cells in enumerate(puzzle_cells):
        for c in cells:
            member[index[c], p] += 1.0
    return 1.0 + (m - 1.0) @ member


def weights_for(puzzle_cells: Sequence[Sequence[str]] | None, puzzle_types, n: int, n_boot: int,
                seed: int) -> tuple[np.ndarray, str]:
    """Cell-resampling weights when the puzzles' cells are known, else the puzzle bootstrap."""
    if puzzle_cells is not None and len(puzzle_cells) == n and all(puzzle_cells):
        return cell_weights(puzzle_cells, puzzle_types, n_boot, seed), CELLS
    return puzzle_weights(n, n_boot, seed), PUZZLES


def known_cells(puzzles: Sequence[Puzzle]) -> list[list[str]] | None:
    """The puzzles' cell ids, or None when they are the placeholders of records without ids."""
    if any(p.cell_ids == [f"cell{i + 1}" for i in range(p.n)] for p in puzzles):
        return None
    return [list(p.cell_ids) for p in puzzles]


def score_puzzles(puzzles: Sequence[Puzzle], completions: Sequence[str], n_boot: int = 1000, seed: int = 0) -> dict:
    """``task.reward.score`` of completions for these puzzles, intervals resampling test cells."""
    w, scheme = weights_for(known_cells(puzzles), [p.answer for p in puzzles], len(puzzles), n_boot, seed) \
        if n_boot > 0 and puzzles else (None, PUZZLES)
    return score(completions, [p.answer_text for p in puzzles], n_boot=n_boot, seed=seed, weights=w, scheme=scheme)


def paired_bootstrap(diff: np.ndarray, n_boot: int, confidence: float, seed: int,
                     weights: np.ndarray | None = None) -> tuple[float, float, float]:
    """Mean of per-puzzle differences and its percentile interval (``weights`` [draws, puzzles];
    default: resampling puzzles)."""
    w = weights if weights is not None else puzzle_weights(len(diff), n_boot, seed)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = (w @ diff) / w.sum(axis=1)
    means = means[np.isfinite(means)]
    a = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(means, [a, 1.0 - a])
    return float(diff.mean()), float(lo), float(hi)


def solved(mode_record: dict) -> dict[str, float]:
    """Puzzle id -> 1.0 when the answer was an exact match (the reference evaluator's rule,
    recorded as ``exact``; older records: batch reward 1), else 0.0."""
    if isinstance(mode_record.get("exact"), dict):
        return {pid: float(bool(x)) for pid, x in mode_record["exact"].items()}
    return {pid: float(r >= 1.0) for pid, r in mode_record.get("rewards", {}).items()}


def record_weights(record: dict, ids: Sequence[str], n_boot: int, seed: int) -> tuple[np.ndarray, str]:
    """Bootstrap weights over ``ids`` from an evaluation record's test cells (when it has them)."""
    cells, types = record.get("cells") or {}, record.get("types") or {}
    have = all(i in cells for i in ids)
    return weights_for([cells[i] for i in ids] if have else None,
                       [types[i] for i in ids] if have and all(i in types for i in ids) else None,
                       len(ids), n_boot, seed)


def paired_difference(after: dict, before: dict, mode: str, n_boot: int = 2000, confidence: float = 0.95,
                      seed: int = 0) -> dict:
    """``after`` minus ``before`` (two evaluation records of the same test puzzles) in batch
    accuracy for one decoding mode: {difference, ci, n, after, before, scheme}; the interval
    resamples test cells when the records carry them."""
    if after.get("test_sha256") != before.get("test_sha256"):
        raise CellPuzzlesError("the two evaluations scored different test puzzles; compare models on the same split")
    if mode not in after["modes"] or mode not in before["modes"]:
        raise CellPuzzlesError(f"mode {mode!r}: not in both evaluations")
    a, b = solved(after["modes"][mode]), solved(before["modes"][mode])
    ids = sorted(a)
    diff = np.array([a[i] - b[i] for i in ids])
    w, scheme = record_weights(after, ids, n_boot, seed)
    mean, lo, hi = paired_bootstrap(diff, n_boot, confidence, seed, w)
    return {"difference": round(mean, 4), "ci": [round(lo, 4), round(hi, 4)], "n": len(ids), "scheme": scheme,
            "after": round(float(np.mean([a[i] for i in ids])), 4), "before": round(float(np.mean([b[i] for i in ids])), 4)}

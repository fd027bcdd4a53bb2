"""Two models scored on the same test puzzles, compared pair by pair: the mean difference in
batch accuracy (puzzles solved exactly) with a paired bootstrap interval."""

from __future__ import annotations

import numpy as np

from cellpuzzles.core.errors import CellPuzzlesError


def paired_bootstrap(diff: np.ndarray, n_boot: int, confidence: float, seed: int) -> tuple[float, float, float]:
    """Mean of per-puzzle differences and its percentile interval (resampling puzzles)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diff), size=(n_boot, len(diff)))
    means = diff[idx].mean(axis=1)
    a = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(means, [a, 1.0 - a])
    return float(diff.mean()), float(lo), float(hi)


def solved(mode_record: dict) -> dict[str, float]:
    """Puzzle id -> 1.0 when the model's answer was exactly right (batch reward 1), else 0.0."""
    return {pid: float(r >= 1.0) for pid, r in mode_record.get("rewards", {}).items()}


def paired_difference(after: dict, before: dict, mode: str, n_boot: int = 2000, confidence: float = 0.95,
                      seed: int = 0) -> dict:
    """``after`` minus ``before`` (two evaluation records of the same test puzzles) in batch
    accuracy for one decoding mode: {difference, ci, n, after, before}."""
    if after.get("test_sha256") != before.get("test_sha256"):
        raise CellPuzzlesError("the two evaluations scored different test puzzles; compare models on the same split")
    if mode not in after["modes"] or mode not in before["modes"]:
        raise CellPuzzlesError(f"mode {mode!r}: not in both evaluations")
    a, b = solved(after["modes"][mode]), solved(before["modes"][mode])
    ids = sorted(a)
    diff = np.array([a[i] - b[i] for i in ids])
    mean, lo, hi = paired_bootstrap(diff, n_boot, confidence, seed)
    return {"difference": round(mean, 4), "ci": [round(lo, 4), round(hi, 4)], "n": len(ids),
            "after": round(float(np.mean([a[i] for i in ids])), 4), "before": round(float(np.mean([b[i] for i in ids])), 4)}

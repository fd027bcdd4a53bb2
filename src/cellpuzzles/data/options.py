"""Puzzle sampling options: a light module, so the command line can show their defaults
without importing pandas and anndata."""

from __future__ import annotations

from dataclasses import dataclass

from cellpuzzles.core.errors import CellPuzzlesError


@dataclass
class PuzzleOptions:
    """How puzzles are sampled and split."""

    n_min: int = 3
    n_max: int = 15
    train_per_n: int = 1000  # before the reasoning split is carved out
    test_per_n: int = 50
    split_by: str = "cells"  # "cells": held-out cells; "donor": held-out donors
    test_fraction: float = 0.25
    reasoning_fraction: float = 0.5  # share of train puzzles moved to a reasoning (SFT) split
    seed: int = 0

    def check(self) -> None:
        if self.n_min < 2 or self.n_max < self.n_min:
            raise CellPuzzlesError(f"--n-min {self.n_min} --n-max {self.n_max}: need 2 <= n-min <= n-max")
        if self.split_by not in ("cells", "donor"):
            raise CellPuzzlesError(f"--split-by {self.split_by!r}: choose 'cells' or 'donor'")
        if not 0.0 < self.test_fraction < 1.0:
            raise CellPuzzlesError(f"--test-fraction {self.test_fraction}: must be between 0 and 1")
        if not 0.0 <= self.reasoning_fraction < 1.0:
            raise CellPuzzlesError(f"--reasoning-fraction {self.reasoning_fraction}: must be in [0, 1)")
        if self.train_per_n < 1 or self.test_per_n < 1:
            raise CellPuzzlesError("--train-per-n and --test-per-n must be at least 1")

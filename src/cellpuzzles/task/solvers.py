"""Baseline solvers: random, and a marker-gene solver learned from the training split.

The marker solver treats each type as a profile of how often each gene appears in its
cells' top-gene lists (learned only from training puzzles), scores every (cell, candidate)
pair by the log-likelihood of the cell's gene list under that type, and assigns cells to
candidates one-to-one with the Hungarian method. It is the built-in teacher's engine.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from cellpuzzles.task.assign import assign_labels
from cellpuzzles.task.puzzle import Puzzle, format_completion


class MarkerSolver:
    """Bernoulli gene-presence model per type, rank-weighted, with additive smoothing."""

    name = "markers"

    def __init__(self, alpha: float = 0.5, rank_decay: float = 0.02):
        self.alpha = alpha
        self.rank_decay = rank_decay  # genes ranked lower count a little less
        self.types: list[str] = []
        self.genes: dict[str, int] = {}

    def fit(self, puzzles: Iterable[Puzzle]) -> MarkerSolver:
        cells: dict[str, tuple[str, list[str]]] = {}
        for p in puzzles:
            for i, (cid, genes, t) in enumerate(zip(p.cell_ids, p.genes, p.answer)):
                cells.setdefault(cid if cid else f"{p.puzzle_id}:{i}", (t, genes))
        if not cells:
            raise ValueError("no training cells to learn markers from")
        self.types = sorted({t.strip().lower() for t, _ in cells.values()})
        tindex = {t: i for i, t in enumerate(self.types)}
        vocab = sorted({g for _, gs in cells.values() for g in gs})
        self.genes = {g: i for i, g in enumerate(vocab)}
        hits = np.zeros((len(self.types), len(vocab)))
        n = np.zeros(len(self.types))
        for t, gs in cells.values():
            ti = tindex[t.strip().lower()]
            n[ti] += 1
            for g in gs:
                hits[ti, self.genes[g]] += 1
        p = (hits + self.alpha) / (n[:, None] + 2 * self.alpha)
        self.log_p = np.log(p)
        self.log_q = np.log1p(-p)
        self.base = self.log_q.sum(1)  # log-likelihood of a cell expressing none of the genes
        return self

    def scores(self, puzzle: Puzzle) -> np.ndarray:
        """Cells x candidates log-likelihood matrix (unknown candidate types score 0 for all cells)."""
        out = np.zeros((puzzle.n, len(puzzle.candidates)))
        cand = [self.types.index(c.strip().lower()) if c.strip().lower() in self.types else -1 for c in puzzle.candidates]
        known = [j for j, t in enumerate(cand) if t >= 0]
        rows = np.array([cand[j] for j in known], dtype=int)
        for i, genes in enumerate(puzzle.genes):
            idx = [(r, self.genes[g]) for r, g in enumerate(genes) if g in self.genes]
            if not known:
                break
            s = self.base[rows].copy()
            if idx:
                ranks = np.array([r for r, _ in idx])
                cols = np.array([c for _, c in idx])
                w = np.exp(-self.rank_decay * ranks)
                s += ((self.log_p[rows][:, cols] - self.log_q[rows][:, cols]) * w).sum(1)
            out[i, known] = s
        return out

    def solve(self, puzzle: Puzzle) -> list[str]:
        return assign_labels(self.scores(puzzle), puzzle.candidates)

    def complete(self, puzzle: Puzzle) -> str:
        labels = self.solve(puzzle)
        return format_completion("Marker-gene likelihoods per cell and candidate, assigned one-to-one.", labels)


class RandomSolver:
    """A uniformly random permutation of the candidates (the chance baseline)."""

    name = "random"

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)

    def fit(self, puzzles: Iterable[Puzzle]) -> RandomSolver:
        return self

    def solve(self, puzzle: Puzzle) -> list[str]:
        return [puzzle.candidates[j] for j in self.rng.permutation(puzzle.n)]

    def complete(self, puzzle: Puzzle) -> str:
        return format_completion("Random assignment.", self.solve(puzzle))


SOLVERS = {"markers": MarkerSolver, "random": RandomSolver}


def make_solver(name: str, seed: int = 0):
    if name == "random":
        return RandomSolver(seed)
    if name == "markers":
        return MarkerSolver()
    raise ValueError(f"unknown solver {name!r}; choose one of {', '.join(SOLVERS)}")


def complete_all(solver, puzzles: Sequence[Puzzle]) -> list[str]:
    return [solver.complete(p) for p in puzzles]

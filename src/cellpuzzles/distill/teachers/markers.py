"""The built-in teacher: reasoning traces from the marker-gene solver.

Each trace is a per-cell scaffold (``cellpuzzles.task.scaffold``): line i restates cell i's
first genes, names the assigned type, then cites the cell's genes that most favour it over
the other candidates; when the one-type-per-cell rule moved a cell off its best-scoring
candidate, it says which cell took that candidate. The answer is the solver's one-to-one
assignment. Traces obey the format rule exactly.

    <think>Cell 1: CD74, CD79A, MS4A1, HLA-DRA, CD37, LTB -> B cell: CD79A, MS4A1
    Cell 2: NKG7, GZMB, CCL5, GNLY, CST7, PRF1 -> NK cell: GZMB, NKG7; T cell taken by Cell 3
    ...</think>
    <answer>B cell | NK cell | ...</answer>
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cellpuzzles.distill.teachers.base import Reply
from cellpuzzles.task.assign import assign
from cellpuzzles.task.puzzle import Puzzle, format_completion
from cellpuzzles.task.scaffold import cell_line
from cellpuzzles.task.solvers import MarkerSolver


class MarkersTeacher:
    name = "markers"

    def __init__(self, train: Sequence[Puzzle], evidence_genes: int = 2, visible_genes: int | None = None,
                 restated_genes: int = 6):
        """``visible_genes``: cite evidence only among each cell's first k genes (what a
        student shown k genes per cell can see); the assignment still uses every gene.
        ``restated_genes``: how many of each cell's first genes a line restates (at most
        ``visible_genes``)."""
        self.solver = MarkerSolver().fit(train)
        self.evidence_genes = evidence_genes
        self.visible_genes = visible_genes
        self.restated_genes = min(restated_genes, visible_genes or restated_genes)

    def trace(self, puzzle: Puzzle) -> str:
        s = self.solver
        scores = s.scores(puzzle)
        choice = assign(scores)
        labels = [puzzle.candidates[j] for j in choice]
        owner = {j: i for i, j in enumerate(choice)}
        cand = [s.types.index(c.strip().lower()) if c.strip().lower() in s.types else -1 for c in puzzle.candidates]
        lines = []
        for i, genes in enumerate(puzzle.genes):
            t = cand[choice[i]]
            shown = genes if self.visible_genes is None else genes[: self.visible_genes]
            known = [(r, g) for r, g in enumerate(shown) if g in s.genes]
            cited: list[str] = []
            if t >= 0 and known:
                cols = np.array([s.genes[g] for _, g in known])
                w = np.exp(-s.rank_decay * np.array([r for r, _ in known]))
                contrib = (s.log_p[:, cols] - s.log_q[:, cols]) * w  # types x genes
                others = [c for c in cand if c >= 0 and c != t]
                rel = contrib[t] - (contrib[others].max(0) if others else 0.0)
                order = np.argsort(-rel, kind="stable")[: self.evidence_genes]
                cited = [known[k][1] for k in order if rel[k] > 0]
            line = f"{cell_line(i, genes, self.restated_genes)}{labels[i]}: {', '.join(cited) if cited else 'no clear markers'}"
            best = int(np.argmax(scores[i]))
            if best != choice[i]:
                line += f"; {puzzle.candidates[best]} taken by Cell {owner[best] + 1}"
            lines.append(line)
        return format_completion("\n".join(lines), labels)

    def complete_many(self, items: Sequence[tuple[Puzzle, int]]) -> list[Reply]:
        # deterministic: every attempt gives the same trace
        return [Reply(puzzle_id=p.puzzle_id, attempt=a, text=self.trace(p)) for p, a in items]

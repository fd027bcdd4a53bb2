"""What a puzzle's answer gives each of its cells: scores over all candidates (constrained
decoding with a local model), or only labels (free text, or the endpoint, whose V1 route
returns assignments, not scores), plus the reasoning text and, for a failed puzzle, why."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cellpuzzles.task.puzzle import Puzzle, extract_answer, is_well_formed, split_labels, think_part


@dataclass
class PuzzleAnswer:
    labels: list[str | None]  # per cell of the puzzle (None: no valid label)
    completion: str = ""
    scores: np.ndarray | None = None  # cells x candidates (candidates in the puzzle's sorted order)
    error: str | None = None  # the whole puzzle failed (e.g. the endpoint gave up)
    notes: list[str] = field(default_factory=list)

    def reasoning(self, i: int) -> str:
        """Cell i's line of the reasoning when the think part has one line per cell (the
        scaffold), else the whole reasoning."""
        think = think_part(self.completion).strip() if self.completion else ""
        lines = think.split("\n")
        mine = [x for x in lines if x.startswith(f"Cell {i + 1}:")]
        return mine[0] if len(mine) == 1 else think


def labels_from_text(puzzle: Puzzle, completion: str) -> tuple[list[str | None], str | None]:
    """Per-cell labels a free completion gives (None where a label is not a candidate), and
    why the answer as a whole is not a valid one (None when it is)."""
    text = extract_answer(completion)
    if text is None:
        return [None] * puzzle.n, "no answer found in the completion"
    canon = {c.lower(): c for c in puzzle.candidates}
    said = split_labels(text)
    labels = [canon.get(x.lower()) for x in said[:puzzle.n]] + [None] * max(0, puzzle.n - len(said))
    problems = []
    if not is_well_formed(completion):
        problems.append("the completion breaks the <think>…</think>\\n<answer>…</answer> format")
    if len(said) != puzzle.n:
        problems.append(f"{len(said)} labels for {puzzle.n} groups")
    unknown = [x for x in said if x.lower() not in canon]
    if unknown:
        problems.append(f"labels not among the candidates: {', '.join(unknown[:3])}")
    return labels, "; ".join(problems) or None


def shape_note(puzzle: Puzzle) -> str | None:
    """Free text from a prompt whose shape the model never saw in training (square puzzles)."""
    if puzzle.n == len(puzzle.candidates):
        return None
    return (f"free mode: the prompt lists {puzzle.n} groups and {len(puzzle.candidates)} candidates, unlike the square "
            "puzzles the model trained on (each candidate exactly once); the model's text may not fit it")

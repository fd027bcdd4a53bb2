"""The per-cell reasoning scaffold: a think part whose line i restates cell i's first k genes
and then names its type,

    <think>Cell 1: CD79A, MS4A1, CD74 -> B cell: CD79A, MS4A1
    Cell 2: GNLY, NKG7, CCL5 -> NK cell: GNLY, NKG7; T cell taken by Cell 3</think>

The built-in teacher writes its traces this way. A line starts as the prompt's own line for
that cell, so a student copies the genes (an induction pattern small models learn fast) and
then decides the type from the few genes right before it, instead of having to find cell
i's genes across the prompt. A model trained on such traces records k in its model folder
(``PromptOptions.restated_genes``); constrained decoding then writes the restated genes
itself and scores every candidate at each line's type slot (``cellpuzzles.inference.decode``).
"""

from __future__ import annotations

from collections.abc import Sequence

from cellpuzzles.task.puzzle import Puzzle, think_part

ARROW = " -> "


def cell_line(i: int, genes: Sequence[str], k: int) -> str:
    """Line ``i`` (0-based) up to its type slot: ``Cell i+1: G1, ..., Gk -> ``."""
    return f"Cell {i + 1}: {', '.join(genes[:k])}{ARROW}"


def think_lines(puzzle: Puzzle, k: int, labels: Sequence[str]) -> str:
    """The scaffold's think text (without tags) for the given labels, one line per cell."""
    return "\n".join(cell_line(i, g, k) + label for i, (g, label) in enumerate(zip(puzzle.genes, labels)))


def restated_genes(pairs: Sequence[tuple[Puzzle, str]]) -> int | None:
    """k when every trace's think part restates each cell's first k genes (of the puzzle as
    given) in scaffold lines, else None."""
    lines = [(p, think_part(trace).split("\n")) for p, trace in pairs]
    k = 0
    for _p, ls in lines:
        for line in ls:
            head, sep, _ = line.partition(ARROW)
            if sep and ": " in head:
                k = max(k, len(head.split(": ", 1)[1].split(", ")))
    if k == 0:
        return None
    for p, ls in lines:
        if len(ls) < p.n or any(not ls[i].startswith(cell_line(i, p.genes[i], k)) for i in range(p.n)):
            return None
    return k

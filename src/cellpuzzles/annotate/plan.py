"""A donor's groups as puzzles: the cells of a puzzle are groups, the candidates are all of
the analyst's candidate types.

At most ``size`` groups share a puzzle (``size`` = the model's N limit, capped by the number of
candidates). A donor with more groups is cut into puzzles of ``size`` home groups; the last
one is topped up with groups from the earlier ones ("fillers", their answers there unused) so
that every puzzle keeps the square shape the model trained on whenever the donor has as many
groups as candidates. Each group's answer comes from its home puzzle; the table says which
groups shared it."""

from __future__ import annotations

from dataclasses import dataclass

from cellpuzzles.task.puzzle import Puzzle, context_sentence


@dataclass
class PlannedPuzzle:
    puzzle: Puzzle  # cells = groups (cell_ids = table row numbers as text), candidates sorted
    rows: list[int]  # table rows of the puzzle's cells, in cell order
    home: list[int]  # the rows answered by this puzzle (the rest are fillers)
    donor: str
    name: str  # e.g. "donor-1/p2"


def plan_donor(donor: str, rows: list[int], genes: list[list[str]], context: dict[str, str],
               candidates: list[str], size: int) -> list[PlannedPuzzle]:
    """Puzzles for one donor's rows (``genes[r]`` the top genes of row r)."""
    chunks = [rows[i:i + size] for i in range(0, len(rows), size)]
    out = []
    for k, home in enumerate(chunks, start=1):
        cells = list(home)
        if len(cells) < size and len(rows) > len(cells):
            cells += [r for r in rows if r not in home][: size - len(cells)]
        sentence = context_sentence(context)
        cands = sorted(candidates)
        p = Puzzle(genes=[list(genes[r]) for r in cells], candidates=cands, answer=list(cands[:len(cells)]),
                   context=sentence, donor_id=donor, cell_ids=[str(r) for r in cells])
        out.append(PlannedPuzzle(puzzle=p, rows=cells, home=list(home), donor=donor, name=f"{donor}/p{k}"))
    return out

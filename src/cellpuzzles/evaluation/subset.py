"""A smaller test set that still covers every puzzle size: the test split is sorted by N, so
its first K puzzles would all be N=3 and a gate would decide on the easiest size alone."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from cellpuzzles.task.puzzle import Puzzle


def stratified(puzzles: Sequence[Puzzle], k: int | None) -> list[Puzzle]:
    """``k`` puzzles taken in turn from each N (in the split's order within an N), returned in
    the split's order; all of them when ``k`` is None or covers the split."""
    if k is None or k >= len(puzzles):
        return list(puzzles)
    by_n: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(puzzles):
        by_n[p.n].append(i)
    queues = [by_n[n] for n in sorted(by_n)]
    picked: list[int] = []
    depth = 0
    while len(picked) < k:
        for q in queues:
            if depth < len(q) and len(picked) < k:
                picked.append(q[depth])
        depth += 1
    return [puzzles[i] for i in sorted(picked)]

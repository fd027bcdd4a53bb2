"""RL vs SFT on the same test puzzles: the paired difference and its interval."""

import pytest

from cellpuzzles.core.errors import CellPuzzlesError
from cellpuzzles.evaluation.compare import paired_difference


def record(rewards, sha="t"):
    return {"test_sha256": sha, "modes": {"constrained": {"rewards": {f"p{i}": r for i, r in enumerate(rewards)}}}}


def test_paired_difference_counts_exact_solutions_pair_by_pair():
    after = record([1.0, 1.0, 1.0, 0.5, -1.0, 1.0, 1.0, 1.0])
    before = record([1.0, 0.5, 0.0, 0.5, 1.0, 0.0, 0.5, 1.0])
    d = paired_difference(after, before, "constrained", n_boot=500)
    assert d["after"] == 0.75 and d["before"] == 0.375 and d["difference"] == 0.375 and d["n"] == 8
    assert d["ci"][0] <= 0.375 <= d["ci"][1] and d["ci"][0] > -0.2  # 4 gained, 1 lost
    same = paired_difference(after, after, "constrained", n_boot=200)
    assert same["difference"] == 0 and same["ci"] == [0.0, 0.0]


def test_paired_difference_refuses_different_test_sets():
    with pytest.raises(CellPuzzlesError, match="different test puzzles"):
        paired_difference(record([1.0], "a"), record([1.0], "b"), "constrained")


# -- intervals that resample test cells --------------------------------------------------------
import numpy as np  # noqa: E402

from cellpuzzles.evaluation.compare import cell_weights, score_puzzles  # noqa: E402
from cellpuzzles.task.puzzle import Puzzle, format_completion  # noqa: E402
from cellpuzzles.task.reward import puzzle_weights, score  # noqa: E402


def _puzzles(n_puzzles=60):
    """Every puzzle holds one of the two cells of a rare type R (r0 or r1, as a rare type's few
    test cells sit in many puzzles) and two cells of its own."""
    out = []
    for i in range(n_puzzles):
        out.append(Puzzle(genes=[["g"]] * 3, candidates=["A", "B", "R"], answer=["A", "B", "R"], context="c",
                          cell_ids=[f"a{i}", f"b{i}", "r0" if i % 2 else "r1"], puzzle_id=f"p{i}"))
    return out


def test_cell_weights_follow_the_cells_each_puzzle_holds():
    ps = _puzzles(10)
    w = cell_weights([p.cell_ids for p in ps], [p.answer for p in ps], n_boot=400, seed=0)
    assert w.shape == (400, 10)
    assert abs(w.mean() - 1.0) < 0.1  # each cell's multiplicity has mean 1
    # puzzles sharing the rare cell r0 move together: their weights are correlated across draws
    odd, even = w[:, 1::2], w[:, 0::2]
    assert np.corrcoef(odd[:, 0], odd[:, 1])[0, 1] > 0.1  # expected ~0.2: the shared cell's share
    # resampled within each type: r0 and r1 share type R's two draws, so r0-puzzles and r1-puzzles trade off
    assert np.corrcoef(odd[:, 0], even[:, 0])[0, 1] < 0
    # with one cell per puzzle and no sharing, it is the plain bootstrap: weights are multiplicities
    solo = cell_weights([[f"c{i}"] for i in range(8)], None, n_boot=50, seed=1)
    assert (solo == np.round(solo)).all() and (solo.sum(axis=1) == 8).all()


def test_a_shared_cell_widens_the_interval_the_puzzle_bootstrap_keeps_narrow():
    ps = _puzzles(60)
    # the model gets exactly the puzzles holding r1 wrong: the figure hangs on one test cell
    comps = [format_completion("t", ["A", "B", "R"] if "r0" in p.cell_ids else ["B", "A", "R"]) for p in ps]
    cells = score_puzzles(ps, comps, n_boot=1000, seed=0)
    plain = score(comps, [p.answer_text for p in ps], weights=puzzle_weights(len(ps), 1000, 0))
    assert cells["ci_scheme"] == "cells" and cells["batch_accuracy"] == plain["batch_accuracy"] == 0.5
    width = lambda s: s["batch_accuracy_ci"][1] - s["batch_accuracy_ci"][0]  # noqa: E731
    assert width(cells) > 2 * width(plain)
    # puzzles without real cell ids (public records): the puzzle bootstrap, and it says so
    anon = [Puzzle(genes=p.genes, candidates=p.candidates, answer=p.answer, context="c", puzzle_id=p.puzzle_id) for p in ps]
    assert score_puzzles(anon, comps, n_boot=200)["ci_scheme"] == "puzzles"


def test_paired_difference_resamples_cells_when_the_records_carry_them():
    ids = [f"p{i}" for i in range(40)]
    cells = {pid: [f"a{i}", "shared" if i < 20 else f"s{i}"] for i, pid in enumerate(ids)}
    types = {pid: ["A", "B"] for pid in ids}
    after = {"test_sha256": "t", "cells": cells, "types": types,
             "modes": {"constrained": {"exact": {pid: i < 20 for i, pid in enumerate(ids)}}}}
    before = {"test_sha256": "t", "modes": {"constrained": {"exact": {pid: False for pid in ids}}}}
    d = paired_difference(after, before, "constrained", n_boot=500)
    assert d["scheme"] == "cells" and d["difference"] == 0.5
    plain = paired_difference({**after, "cells": None}, before, "constrained", n_boot=500)
    assert plain["scheme"] == "puzzles"
    assert d["ci"][1] - d["ci"][0] > plain["ci"][1] - plain["ci"][0]

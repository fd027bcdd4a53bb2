"""The classical peer (logistic regression alone / one-to-one) and the input ceiling, trained on
the train cells only and scored like a model on the same test puzzles."""

import json

import numpy as np
import pytest

from cellpuzzles.core.errors import CellPuzzlesError
from cellpuzzles.data.cells import CellsOptions, build_cells
from cellpuzzles.data.options import PuzzleOptions
from cellpuzzles.data.sample import make_splits
from cellpuzzles.evaluation.peers import (
    ALONE,
    ONE_TO_ONE,
    _complete,
    ceiling_for,
    ceiling_name,
    describe,
    evaluate_peers,
    read_expression,
    write_expression,
)
from cellpuzzles.task.puzzle import Puzzle, extract_answer, split_labels


def _labels(completion: str) -> list[str]:
    return split_labels(extract_answer(completion))


def test_one_to_one_resolves_what_labelling_each_cell_alone_cannot():
    # both cells look most like "A"; the second less so: alone says A, A; one-to-one says A, B
    p = Puzzle(genes=[["g1"], ["g2"]], candidates=["A", "B"], answer=["A", "B"], context="c", cell_ids=["x", "y"])
    lp = {"x": np.log([0.9, 0.1]), "y": np.log([0.6, 0.4])}
    assert _labels(_complete([p], lp, ["A", "B"], False, "t")[0]) == ["A", "A"]
    assert _labels(_complete([p], lp, ["A", "B"], True, "t")[0]) == ["A", "B"]
    # a candidate type the classifier never saw scores worst, but one-to-one still uses it once
    q = Puzzle(genes=[["g"], ["g"]], candidates=["A", "Z"], answer=["Z", "A"], context="c", cell_ids=["x", "y"])
    assert sorted(_labels(_complete([q], lp, ["A", "B"], True, "t")[0])) == ["A", "Z"]


@pytest.fixture
def world(tmp_path, h5ad_file):
    cells = build_cells(h5ad_file, CellsOptions(top_k=20, progress=False))
    splits, _ = make_splits(cells, PuzzleOptions(n_min=3, n_max=5, train_per_n=20, test_per_n=6, seed=0))
    expr = write_expression(h5ad_file, list(cells.obs["cell_id"]), tmp_path / "expression.h5ad")
    return cells, splits["train"] + splits["reasoning"], splits["test"], expr


def test_expression_is_log_normalised_counts_with_the_cells_ids(world):
    cells, _, _, expr = world
    a = read_expression(expr)
    assert list(a.obs_names) == list(cells.obs["cell_id"])
    totals = np.expm1(a.X.toarray()).sum(axis=1)  # counts were normalised to 10,000 then log1p'd
    np.testing.assert_allclose(totals, 1e4, rtol=1e-3)


def test_peers_scored_on_the_test_puzzles_and_written(world, tmp_path):
    _, train, test, expr = world
    res = evaluate_peers(train, test, read_expression(expr), (3, 20), out_dir=tmp_path, seed=0)
    assert set(res) == {ALONE, ONE_TO_ONE, ceiling_name(3), ceiling_name(20)}
    for name, r in res.items():
        assert r["n"] == len(test) and r["ci_scheme"] == "cells"
        lines = [json.loads(x) for x in (tmp_path / f"predictions_{name}.jsonl").read_text().splitlines()]
        assert [x["puzzle_id"] for x in lines] == [p.puzzle_id for p in test]
        assert json.loads((tmp_path / f"metrics_{name}.json").read_text())["batch_accuracy"] == r["batch_accuracy"]
    for x, p in zip((tmp_path / f"predictions_{ONE_TO_ONE}.jsonl").read_text().splitlines(), test):
        assert sorted(_labels(json.loads(x)["completion"])) == sorted(p.candidates)  # a permutation
    # the marker structure of the test data is easy: the classifier on expression gets it right
    assert res[ONE_TO_ONE]["batch_accuracy"] == 1.0
    assert res[ONE_TO_ONE]["batch_accuracy"] >= res[ALONE]["batch_accuracy"]


def test_peer_refuses_cells_missing_from_the_expression_matrix(world):
    _, train, test, expr = world
    a = read_expression(expr)
    keep = [c for c in a.obs_names if c != test[0].cell_ids[0]]
    with pytest.raises(CellPuzzlesError, match="not in the expression matrix"):
        evaluate_peers(train, test, a[keep].copy())


def test_missing_expression_file_is_one_clear_line(tmp_path):
    with pytest.raises(CellPuzzlesError, match="rerun the validate step"):
        read_expression(tmp_path / "expression.h5ad")


def test_names_and_the_ceiling_matching_a_model():
    base = {"markers": {}, ceiling_name(6): {}, ceiling_name(50): {}}
    assert ceiling_for(base, 6) == "ceiling_top6" and ceiling_for(base, None) == "ceiling_top50"
    assert ceiling_for(base, 12) == "ceiling_top50" and ceiling_for({"markers": {}}, 6) is None
    assert "one-to-one" in describe(ONE_TO_ONE) and "top 6 gene names" in describe("ceiling_top6")


@pytest.mark.slow
def test_on_the_bundled_pbmc_data_the_one_to_one_rule_carries_the_classifier(tmp_path):
    from cellpuzzles.data.bundled import materialise
    from cellpuzzles.evaluation.evaluate import evaluate_solver

    f = materialise(tmp_path / "data")
    cells = build_cells(f, CellsOptions(top_k=50, progress=False))
    splits, _ = make_splits(cells, PuzzleOptions(n_min=3, n_max=10, test_per_n=20, train_per_n=200, seed=0))
    train, test = splits["train"] + splits["reasoning"], splits["test"]
    expr = read_expression(write_expression(f, list(cells.obs["cell_id"]), tmp_path / "e.h5ad"))
    res = evaluate_peers(train, test, expr, (6, 50))
    rand = evaluate_solver("random", train, test)
    # measured here: one-to-one 0.84-0.86 vs alone ~0.18 on split seed 0 (FACTS.md)
    assert res[ONE_TO_ONE]["batch_accuracy"] > res[ALONE]["batch_accuracy"] + 0.3
    assert res[ALONE]["cell_accuracy"] > rand["cell_accuracy"]
    # the model's input holds less than the expression profile: the ceiling sits below the peer
    assert res[ceiling_name(6)]["batch_accuracy"] < res[ONE_TO_ONE]["batch_accuracy"]


@pytest.mark.slow
def test_puzzles_step_scores_and_logs_the_peers_beside_markers_and_random(tmp_path, h5ad_file, monkeypatch):
    """The pipeline's puzzles step (library function, local SQLite MLflow store): baselines.json
    and the step's MLflow run hold the peers and the ceiling, the splits are dataset inputs."""
    import mlflow

    from cellpuzzles.core.tracking import connect
    from cellpuzzles.evaluation.peers import EXPRESSION_FILE
    from cellpuzzles.steps.data import puzzles_step

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cells = build_cells(h5ad_file, CellsOptions(top_k=20, progress=False))
    (tmp_path / "cells").mkdir()
    write_expression(h5ad_file, list(cells.obs["cell_id"]), tmp_path / "cells" / EXPRESSION_FILE)
    cells.to_parquet(tmp_path / "cells" / "cells.parquet")
    uri = connect(tmp_path)
    r = puzzles_step(tmp_path / "cells", tmp_path / "pz", PuzzleOptions(n_min=3, n_max=5, train_per_n=20, test_per_n=6), uri)
    want = {"random", "markers", ALONE, ONE_TO_ONE, "ceiling_top6", "ceiling_top20"}  # 6: the tiny model's view
    assert set(r["baselines"]) == want
    base = json.loads((tmp_path / "pz" / "baselines.json").read_text())
    assert set(base) == want and all(b["ci_scheme"] == "cells" for b in base.values())
    run = mlflow.MlflowClient(uri).get_run(r["mlflow_run_id"])
    assert {d.dataset.name for d in run.inputs.dataset_inputs} == {"train", "reasoning", "test"}
    assert run.data.metrics[f"{ONE_TO_ONE}/batch_accuracy"] == base[ONE_TO_ONE]["batch_accuracy"]
    assert "ceiling_top6/batch_accuracy_ci_lo" in run.data.metrics
    exp = mlflow.MlflowClient(uri).get_experiment(run.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"

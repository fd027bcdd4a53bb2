"""Each test puzzle as an MLflow GenAI evaluation row (evaluation/genai.py), on a real SQLite store.

Puzzles are real Puzzle objects (N = 3..5); completions are built right, wrong (a rotation of
the gold labels) or ill-formed on chosen puzzles, so every row's reward is known. The rows are
read back from the store as the MLflow UI reads them (the run's traces and their assessments).
"""

from __future__ import annotations

import mlflow
import pytest

from cellpuzzles.core.errors import CellPuzzlesError
from cellpuzzles.core.tracking import connect_uri, step_run
from cellpuzzles.evaluation.compare import score_puzzles
from cellpuzzles.evaluation.genai import ROWS_ENV, log_puzzle_rows, row_limit
from cellpuzzles.inference.folder import PromptOptions
from cellpuzzles.release.registry import EXPERIMENT_KIND
from cellpuzzles.task.puzzle import SYSTEM_MSG, format_completion
from cellpuzzles.task.reward import batch_reward

from helpers.registry import make_test_set


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite store for the module (creating its tables takes seconds); each test connects."""
    return f"sqlite:///{tmp_path_factory.mktemp('genai')}/mlflow.db"


def _completions(puzzles: list) -> list[str]:
    out = []
    for i, p in enumerate(puzzles):
        if i % 3 == 0:
            out.append(format_completion(f"cells of puzzle {i} carry their markers", p.answer))  # right
        elif i % 3 == 1:
            out.append(format_completion("a guess", [*p.answer[1:], p.answer[0]]))  # well-formed, wrong
        else:
            out.append(" | ".join(p.answer))  # ill-formed: no tags
    return out


def _rows(run_id: str) -> dict[str, tuple[dict, dict, dict]]:
    """{puzzle_id: (inputs, outputs, {assessment name: value})} of the run's traces."""
    rows = {}
    for t in mlflow.search_traces(run_id=run_id, return_type="list"):
        root = t.data.spans[0]
        values = {a.name: a.value for a in t.info.assessments}
        rows[root.inputs["puzzle_id"]] = (root.inputs, root.outputs, values)
    return rows


def test_one_row_per_puzzle_with_prompt_completion_and_reward(store):
    uri = connect_uri(store)
    mlflow.set_experiment_tag(*EXPERIMENT_KIND)  # as the data step marks it: the UI opens on runs
    test = make_test_set(6)
    comps = {"constrained": _completions(test), "free": ["no answer"] * len(test)}
    prompt = PromptOptions(genes_per_cell=1)  # the model saw one gene per cell: rows show that prompt

    with step_run(uri, "evaluate") as run_id:
        summary = log_puzzle_rows("sft", test, comps, prompt)
        with pytest.raises(CellPuzzlesError, match="no 'greedy' completions"):
            log_puzzle_rows("sft", test, comps, prompt, mode="greedy")

    assert summary["rows"] == summary["puzzles"] == len(test) and summary["mode"] == "constrained"
    rows = _rows(run_id)
    assert sorted(rows) == sorted(p.puzzle_id for p in test)
    rewards = []
    for p, c in zip(test, comps["constrained"]):
        inputs, outputs, values = rows[p.puzzle_id]
        assert inputs["n"] == p.n
        assert inputs["messages"] == [{"role": "system", "content": SYSTEM_MSG},
                                      {"role": "user", "content": prompt.apply(p).user_msg}]
        assert prompt.apply(p).user_msg != p.user_msg  # the cut prompt, not the full puzzle
        assert outputs["completion"] == c
        assert values["answer"] == p.answer_text  # the gold labels as the expectation
        assert values["batch_reward"] == pytest.approx(batch_reward(c, p.answer_text))
        rewards.append(values["batch_reward"])
    assert {1.0, -1.0} <= set(rewards) and any(-1.0 < r < 1.0 for r in rewards)  # right, ill-formed, wrong

    accuracy = score_puzzles(test, comps["constrained"], n_boot=10)["batch_accuracy"]
    assert summary["exact_match_mean"] == pytest.approx(accuracy) == pytest.approx(1 / 3)
    assert summary["batch_reward_mean"] == pytest.approx(sum(rewards) / len(rewards))
    c = mlflow.MlflowClient()
    assert c.get_run(run_id).data.metrics["exact_match/mean"] == pytest.approx(accuracy)
    exp = c.get_experiment(c.get_run(run_id).info.experiment_id)
    assert exp.tags[EXPERIMENT_KIND[0]] == EXPERIMENT_KIND[1]


def test_limit_keeps_every_n_and_env_sets_the_step_cap(store, monkeypatch):
    uri = connect_uri(store)
    test = make_test_set(9)
    with step_run(uri, "evaluate") as run_id:
        summary = log_puzzle_rows("grpo", test, {"constrained": _completions(test)}, limit=3)
    assert summary["rows"] == 3 and summary["puzzles"] == 9
    assert sorted(inputs["n"] for inputs, _, _ in _rows(run_id).values()) == [3, 4, 5]

    monkeypatch.delenv(ROWS_ENV, raising=False)
    assert row_limit() == 100
    for raw, want in (("all", None), ("0", 0), (" 250 ", 250)):
        monkeypatch.setenv(ROWS_ENV, raw)
        assert row_limit() == want
    monkeypatch.setenv(ROWS_ENV, "many")
    with pytest.raises(CellPuzzlesError, match=ROWS_ENV):
        row_limit()

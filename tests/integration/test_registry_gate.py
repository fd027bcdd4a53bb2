"""Registry and promotion gate against a real `mlflow server` on 127.0.0.1.

Evaluation folders are written with the project's write_evaluation from real Puzzle objects
and completions built to be right or wrong on chosen puzzles, so accuracies are known
(tests/helpers/registry.py). Each test uses its own registered model name, so tests do not
depend on each other. (The gate's decision rule without a server: tests/unit/test_gate_decision.py.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cellpuzzles import __version__
from cellpuzzles.core.errors import CellPuzzlesError
from cellpuzzles.release.gate import GateOptions, gate
from cellpuzzles.release.registry import register

from helpers.cli import run_cli
from helpers.net import free_port
from helpers.registry import add_version, aliases, client, make_test_set, write_eval, write_model

pytestmark = pytest.mark.slow  # every test needs the module's MLflow server (seconds to start)


def test_register_stores_model_evaluation_tags_alias_and_is_idempotent(mlflow_server, tmp_path):
    c, name = client(mlflow_server), "reg"
    ps = make_test_set()
    v = add_version(tmp_path, name, "one", ps, set(range(20)))
    mv = c.get_model_version(name, v)
    assert v == "1" and mv.source.endswith("/artifacts/model") and mv.source.startswith("mlflow-artifacts:/")
    # the model folder lives in the version's MLflow 3 logged model (its source); the evaluation in the run
    from mlflow.artifacts import download_artifacts

    folder = Path(download_artifacts(f"models:/{name}/{v}", dst_path=str(tmp_path / "dl")))
    assert {"config.json", "tokenizer.json", "cellpuzzles.json"} <= {p.name for p in folder.iterdir()}
    files = {a.path for a in c.list_artifacts(mv.run_id, "evaluation")}
    assert {"evaluation/evaluation.json", "evaluation/predictions_constrained.jsonl"} <= files
    assert float(mv.tags["metric.constrained.batch_accuracy"]) == 0.5
    assert float(mv.tags["metric.free.format_ratio"]) == 1.0
    assert json.loads(mv.tags["metric.constrained.batch_accuracy_ci"])[0] < 0.5
    assert mv.tags["data_version"] == "md5-test.dir" and mv.tags["code_version"].startswith(__version__)
    assert json.loads(mv.tags["config"]) == {"prompt": {"genes_per_cell": 6}}
    assert len(mv.tags["test_sha256"]) == 64
    assert aliases(c, name) == {"challenger": "1"}

    # the pipeline passes its step run: retrying that registration gives the same version
    exp = c.get_experiment_by_name("cellpuzzles")
    run_id = c.create_run(exp.experiment_id).info.run_id
    model, ev = write_model(tmp_path / "m-two"), write_eval(tmp_path / "e-two", ps, set(range(25)))
    v2 = register(model, ev, name=name, run_id=run_id, tags={"pipeline_run": "abc"})
    assert register(model, ev, name=name, run_id=run_id) == v2 == "2"
    assert len(c.search_model_versions(f"name = '{name}'")) == 2
    mv2 = c.get_model_version(name, v2)
    assert mv2.run_id == run_id and mv2.tags["pipeline_run"] == "abc"
    assert aliases(c, name) == {"challenger": "2"}


def test_register_bad_inputs(mlflow_server, tmp_path):
    with pytest.raises(CellPuzzlesError, match="no config.json"):
        register(tmp_path, write_eval(tmp_path / "e", make_test_set(), set()), name="bad")
    with pytest.raises(CellPuzzlesError, match="evaluation.json: no such file"):
        register(write_model(tmp_path / "m"), tmp_path / "nothing", name="bad")


def test_gate_first_passes_worse_fails_better_promotes_rerun_is_idempotent(mlflow_server, tmp_path):
    c, name = client(mlflow_server), "flow"
    ps = make_test_set()
    v1 = add_version(tmp_path, name, "v1", ps, set(range(20)))  # batch accuracy 0.50
    d1 = gate(name, v1, GateOptions())
    assert d1.passed and d1.moved == {"champion": v1} and aliases(c, name)["champion"] == v1
    assert "previous" not in aliases(c, name)
    assert c.get_model_version(name, v1).tags["gate.champion_version"] == "none"

    v2 = add_version(tmp_path, name, "v2", ps, set(range(10)))  # 0.25: worse on the same puzzles
    d2 = gate(name, "challenger", GateOptions())
    assert not d2.passed and d2.moved == {} and d2.version == v2
    assert "lower bound" in d2.reasons[0] and d2.evidence["delta"] == pytest.approx(-0.25)
    assert aliases(c, name) == {"champion": v1, "challenger": v2}
    tags = c.get_model_version(name, v2).tags
    assert tags["gate.decision"] == "fail" and tags["gate.champion_version"] == v1
    assert float(tags["gate.ci_low"]) < -0.02 and "lower bound" in tags["gate.reasons"]
    run2 = c.get_model_version(name, v2).run_id
    assert "FAIL" in Path(c.download_artifacts(run2, f"gate/report_v{v2}.md", str(tmp_path))).read_text()

    v3 = add_version(tmp_path, name, "v3", ps, set(range(30)))  # 0.75: better
    d3 = gate(name, v3, GateOptions())
    assert d3.passed and d3.moved == {"previous": v1, "champion": v3}
    assert aliases(c, name) == {"champion": v3, "previous": v1, "challenger": v3}
    assert d3.evidence["delta"] == pytest.approx(0.25) and "| delta" in d3.report

    again = gate(name, v3, GateOptions())  # same decision: passes, moves nothing, same evidence
    assert again.passed and again.moved == {}
    assert again.evidence["champion_version"] == v1 and again.evidence["ci_low"] == d3.evidence["ci_low"]
    assert aliases(c, name) == {"champion": v3, "previous": v1, "challenger": v3}


def test_floors_fail_and_nothing_moves(mlflow_server, tmp_path):
    c, name = client(mlflow_server), "floors"
    ps = make_test_set()
    v = add_version(tmp_path, name, "acc", ps, set(range(20)))
    d = gate(name, v, GateOptions(min_batch_accuracy=0.6))
    assert not d.passed and d.reasons == ["batch accuracy 0.5000 < floor 0.6"]
    v2 = add_version(tmp_path, name, "fmt", ps, set(range(20)), ill_formed={20, 21, 22, 23})
    d2 = gate(name, v2, GateOptions())
    assert not d2.passed and any(r.startswith("format ratio 0.9000 < floor 0.95") for r in d2.reasons)
    assert "champion" not in aliases(c, name)
    assert c.get_model_version(name, v2).tags["gate.decision"] == "fail"


def test_different_test_set_fails_with_clear_reason(mlflow_server, tmp_path):
    c, name = client(mlflow_server), "sets"
    v1 = add_version(tmp_path, name, "a", make_test_set(tag="a"), set(range(20)))
    assert gate(name, v1).passed
    v2 = add_version(tmp_path, name, "b", make_test_set(tag="b"), set(range(40)))  # perfect, but other puzzles
    d = gate(name, v2)
    assert not d.passed and d.reasons[0].startswith("different test sets")
    assert "evaluate both on the same test puzzles" in d.reasons[0]
    assert aliases(c, name)["champion"] == v1


def test_missing_metric_fails(mlflow_server, tmp_path):
    name = "missing"
    v = add_version(tmp_path, name, "m", make_test_set(), set(range(20)), drop=("format_ratio",))
    d = gate(name, v)
    assert not d.passed and d.reasons == ["metric constrained.format_ratio is missing"]
    assert "champion" not in aliases(client(mlflow_server), name)


def test_unknown_model_or_version_is_an_error(mlflow_server, tmp_path):
    add_version(tmp_path, "known", "k", make_test_set(), set(range(20)))
    with pytest.raises(CellPuzzlesError, match="'nosuch' does not exist"):
        gate("nosuch", "1")
    with pytest.raises(CellPuzzlesError, match="has no version 7"):
        gate("known", "7")


def _cli(server, *args, cwd):
    return run_cli(*args, cwd=cwd, env={**os.environ, "MLFLOW_TRACKING_URI": server["uri"]}, timeout=300)


def test_cli_exit_codes(mlflow_server, tmp_path):
    ps = make_test_set()
    m, e = write_model(tmp_path / "m1"), write_eval(tmp_path / "e1", ps, set(range(20)))
    r = _cli(mlflow_server, "register", m, e, "--name", "cli", "--data-version", "x.dir", cwd=tmp_path)
    assert r.returncode == 0 and "version 1" in r.stdout, r.stderr
    r = _cli(mlflow_server, "gate", "--name", "cli", "--report", "gate1.md", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "PASS" in (tmp_path / "gate1.md").read_text()

    add_version(tmp_path, "cli", "worse", ps, set(range(5)))
    r = _cli(mlflow_server, "gate", "--name", "cli", "--report", "gate2.md", cwd=tmp_path)
    assert r.returncode == 4
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: 'cli' version 2 not promoted: batch accuracy vs champion")
    assert "FAIL" in (tmp_path / "gate2.md").read_text()

    r = _cli(mlflow_server, "gate", "--name", "cli", "--version", "9", cwd=tmp_path)
    assert r.returncode == 2 and "has no version 9" in r.stderr

    # a version registered by hand, without its evaluation artifact
    c = client(mlflow_server)
    run = c.create_run(c.get_experiment_by_name("cellpuzzles").experiment_id)
    c.create_model_version("cli", source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    r = _cli(mlflow_server, "gate", "--name", "cli", "--version", "3", cwd=tmp_path)
    assert r.returncode == 2 and "has no evaluation/evaluation.json" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1

    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}
    r = run_cli("gate", cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 2 and r.stderr.startswith("error: MLflow tracking server") and "unreachable" in r.stderr


def test_version_page_carries_the_model_card_logged_model_metrics_and_dataset(mlflow_server, tmp_path):
    """What a reviewer sees on a real server: the card as the version's description (pending,
    then the gate's decision with the comparison), metrics linked to an MLflow 3 logged model
    and to the test set, the test set as the run's dataset input, a signature, and an
    experiment that opens on its runs."""
    c, name = client(mlflow_server), "card"
    ps = make_test_set()
    ev = write_eval(tmp_path / "e", ps, set(range(30)))
    m = {"batch_accuracy": 0.84, "batch_accuracy_ci": [0.7, 0.95], "cell_accuracy": 0.94,
         "by_n": {"3": {"batch_accuracy": 0.9}, "4": {"batch_accuracy": 0.85}, "5": {"batch_accuracy": 0.8}}}
    (ev / "baselines.json").write_text(json.dumps({"random": {**m, "batch_accuracy": 0.02}, "logreg_1to1": m,
                                                   "ceiling_top6": {**m, "batch_accuracy": 0.43}}))
    v = register(write_model(tmp_path / "m"), ev, name=name, data_version="md5-card.dir")
    mv = c.get_model_version(name, v)
    assert mv.description.startswith(f"# {name} version {v}") and "Decision: pending" in mv.description
    assert "| classical peer: logistic regression on expression, one-to-one | 0.840 [0.700, 0.950]" in mv.description
    assert "input ceiling: logistic regression on the top 6 gene names" in mv.description  # the model shows 6 genes
    assert "md5-card.dir" in mv.description and f"cellpuzzles deploy --name {name} --version {v}" in mv.description

    # MLflow 3: the version links a logged model whose metrics name the test set
    lm = c.get_logged_model(mv.tags["logged_model_id"])
    assert mv.source == f"{lm.artifact_location}/model" and lm.source_run_id == mv.run_id
    got = {x.key: x for x in lm.metrics}
    assert got["constrained/batch_accuracy"].value == 0.75 and got["constrained/batch_accuracy"].dataset_name == "test"
    assert "constrained/batch_accuracy_ci_lo" in got and lm.params.get("prompt.genes_per_cell") == "6"
    run = c.get_run(mv.run_id)
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["test"]
    assert run.inputs.dataset_inputs[0].dataset.digest == json.loads((ev / "evaluation.json").read_text())["test_sha256"][:16]
    from mlflow.artifacts import download_artifacts

    mlmodel = Path(download_artifacts(f"{lm.artifact_location}/MLmodel", dst_path=str(tmp_path / "lm")))
    assert "signature" in mlmodel.read_text() and "candidates" in mlmodel.read_text()
    assert c.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"

    d = gate(name, v, GateOptions())  # no champion: passes on the floors; the card now says so
    after = c.get_model_version(name, v).description
    assert d.passed and "Decision: PASS" in after and "Decision: pending" not in after
    n3 = json.loads((ev / "evaluation.json").read_text())["modes"]["constrained"]["by_n"]["3"]["batch_accuracy"]
    assert "Batch accuracy by N" in after and f"| 3 | {n3:.3f} | 0.900 | 0.900 | 0.900 |" in after  # vs peer, ceiling, random

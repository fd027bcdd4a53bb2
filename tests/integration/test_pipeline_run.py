"""`cellpuzzles run` executes the real retraining pipeline with kfp.local, logging to a real
`mlflow server` on 127.0.0.1: a run killed mid-way, the run after it (reusing the finished
steps), and a third run whose challenger is gated against the champion."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers.net import free_port
from helpers.paths import ROOT

pytestmark = pytest.mark.slow  # real pipeline runs with kfp.local (minutes)
SMALL = ["--sft-steps", "6", "--rl-steps", "1", "--eval-limit", "6", "--param", "train_per_n=40",
         "--param", "test_per_n=6", "--param", "n_max=5",
         "--param", "min_batch_accuracy=0.0"]  # 6 puzzles: any accuracy passes the floor
STEPS = ["validate", "puzzles", "distill", "sft", "rl"]


def _env(server):
    return {**os.environ, "MLFLOW_TRACKING_URI": server["uri"],
            "CELLPUZZLES_ARTIFACT_STORE": server["artifacts"].as_uri()}


def _run(work, server, *extra, timeout=1200):
    return subprocess.run([sys.executable, "-m", "cellpuzzles.cli", "run", "--out", "out", *SMALL, *extra], cwd=work,
                          env=_env(server), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def runs(mlflow_server, tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    for name in ("data.dvc", ".dvcignore"):
        shutil.copy(ROOT / name, work / name)
    shutil.copytree(ROOT / ".dvc", work / ".dvc", ignore=shutil.ignore_patterns("cache", "tmp"))
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    # 1. killed while SFT trains
    log = work / "out" / "pipeline.log"
    proc = subprocess.Popen([sys.executable, "-m", "cellpuzzles.cli", "run", "--out", "out", *SMALL], cwd=work,
                            env=_env(mlflow_server), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 900
    while not (log.is_file() and "Executing task \x1b[96m'sft'" in log.read_text(errors="replace")):
        assert proc.poll() is None and time.time() < deadline, "the run ended before SFT started"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = {"summary": (work / "out" / "summary.json").exists()}
    # 2. the run after it, 3. one more on the same data
    second = _run(work, mlflow_server)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    s2 = json.loads((work / "out" / "summary.json").read_text())
    third = _run(work, mlflow_server)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    s3 = json.loads((work / "out" / "summary.json").read_text())
    return {"work": work, "killed": killed, "second": (second, s2), "third": (third, s3)}


def test_a_killed_run_leaves_nothing_that_passes_for_complete(runs):
    assert not runs["killed"]["summary"]
    _, s2 = runs["second"]
    # finished steps are reused; the step that was killed (and everything after it) runs again
    assert s2["reused_steps"] == ["validate", "puzzles", "distill"]


def test_run_ends_with_the_gate_decision_champion_and_manifest(runs, mlflow_server):
    r, s = runs["second"]
    assert "gate: PASS for cellpuzzles version 1" in r.stdout
    assert s["gate"]["decision"] == "pass" and s["registered_version"] == "1"
    cons = s["models"]["grpo"]["constrained"]
    assert cons["format_ratio"] == 1.0 and 0.0 <= cons["batch_accuracy"] <= 1.0
    # the accuracy the summary reports is the one the registered version carries
    from mlflow.tracking import MlflowClient

    tags = MlflowClient(mlflow_server["uri"]).get_model_version("cellpuzzles", "1").tags
    assert float(tags["metric.constrained.batch_accuracy"]) == pytest.approx(cons["batch_accuracy"])
    assert s["baselines"]["markers"]["batch_accuracy"] > s["baselines"]["random"]["batch_accuracy"]
    manifest = yaml.safe_load(Path(s["manifest"]).read_text())
    assert manifest["kind"] == "InferenceService"
    assert manifest["metadata"]["labels"]["cellpuzzles.io/model-version"] == "1"
    uri = manifest["spec"]["predictor"]["model"]["storageUri"]
    assert uri.startswith(mlflow_server["artifacts"].as_uri())  # the real location of the registered folder
    assert (Path(uri.removeprefix("file://")) / "config.json").is_file()
    assert f"kubectl apply -f {s['manifest']}" in r.stdout
    # the recipe's question, answered in every run: the SFT model on the same puzzles, paired
    assert set(s["models"]) == {"start", "sft", "grpo"}
    start = s["models"]["start"]  # the untrained start, cheaply: constrained only, the same test puzzles
    assert set(start) == {"constrained"} and start["constrained"]["n"] == cons["n"] == s["models"]["sft"]["constrained"]["n"]
    d = s["rl_vs_sft"]["constrained"]
    assert d["after"] == pytest.approx(cons["batch_accuracy"], abs=1e-4)
    assert d["before"] == pytest.approx(s["models"]["sft"]["constrained"]["batch_accuracy"], abs=1e-4)
    assert d["ci"][0] <= d["difference"] <= d["ci"][1]
    assert "RL vs SFT (constrained)" in r.stdout and "| constrained |" in Path(s["gate_report"]).read_text()
    assert tags["rl_vs_sft.constrained"].startswith(f"{d['difference']:+.4f}")
    prov = s["provenance"]
    assert prov["versions"]["torch"] and len(prov["code"]["commit"] or "") == 40 and prov["machine"]["cpus"] >= 1


def test_mlflow_has_step_runs_pipeline_run_and_registered_version(runs, mlflow_server):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(mlflow_server["uri"])
    exp = c.get_experiment_by_name("cellpuzzles")
    retrain = c.search_runs([exp.experiment_id], "attributes.run_name = 'retrain'")
    done = [r for r in retrain if r.data.tags.get("pipeline.state") == "SUCCEEDED"]
    assert len(done) == 2
    # the step runs of the two successful pipeline runs (the server is the module's: another
    # test's failed run may have logged step runs too, before or after these)
    succeeded = {r.info.run_id for r in done}
    step_runs = {r.info.run_name: r for r in c.search_runs([exp.experiment_id], "tags.`cellpuzzles.step` != ''")
                 if r.data.tags.get("mlflow.parentRunId") in succeeded}
    assert {"validate", "puzzles", "distill", "sft", "rl-grpo", "evaluate"} <= set(step_runs)
    assert step_runs["validate"].data.tags["data.dvc_md5"].endswith(".dir")
    assert c.get_metric_history(step_runs["sft"].info.run_id, "sft/loss")
    assert "rl_grpo/reward" in step_runs["rl-grpo"].data.metrics
    assert "constrained/batch_accuracy" in step_runs["evaluate"].data.metrics
    assert all(f"step.{s}.run_id" in done[0].data.tags for s in ("validate", "sft", "rl", "evaluate"))
    # step runs nest under the pipeline run that made them (the killed run's are adopted by the next)
    first = min(done, key=lambda r: r.info.start_time)
    nested = c.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{first.info.run_id}'")
    assert {"validate", "puzzles", "distill", "sft", "rl-grpo", "evaluate"} <= {r.info.run_name for r in nested}
    assert re.fullmatch(r"[0-9a-f]{64}", step_runs["puzzles"].data.tags["puzzles.test.sha256"])
    plots = {a.path for a in c.list_artifacts(step_runs["evaluate"].info.run_id, "plots")}
    assert {"plots/accuracy_by_n.png", "plots/confusion.png"} <= plots
    # the killed run never reached its exit handler: no state, and no model version
    v1 = c.get_model_version("cellpuzzles", "1")
    assert v1.tags["data_version"].endswith(".dir") and "metric.constrained.batch_accuracy" in v1.tags
    assert v1.tags["step.sft.run_id"] in {r.data.tags["step.sft.run_id"] for r in done}


def test_third_run_reuses_every_training_step_and_moves_the_champion(runs, mlflow_server):
    from mlflow.tracking import MlflowClient

    r, s = runs["third"]
    assert s["reused_steps"] == STEPS
    assert Path(s["data_docs"]).is_file()  # the reused validate step's data docs, from the run that made them
    assert "PASS" in Path(s["gate_report"]).read_text() and "champion before: 1" in Path(s["gate_report"]).read_text()
    assert s["gate"]["decision"] == "pass" and s["registered_version"] == "2"
    assert s["gate"]["evidence"]["champion_version"] == "1"  # compared pair by pair with the champion
    c = MlflowClient(mlflow_server["uri"])
    assert c.get_model_version_by_alias("cellpuzzles", "champion").version == "2"
    assert c.get_model_version_by_alias("cellpuzzles", "previous").version == "1"
    assert c.get_model_version("cellpuzzles", "2").tags["gate.decision"] == "pass"


def test_a_failing_step_fails_the_run_naming_step_and_reason(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    bad = tmp_path / "notes.h5ad"
    bad.write_text("not an h5ad file")
    r = subprocess.run([sys.executable, "-m", "cellpuzzles.cli", "run", "--out", "out", "--data", str(bad), *SMALL],
                       cwd=tmp_path, env=_env(mlflow_server), capture_output=True, text=True, timeout=600)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: pipeline failed at step validate:") and "notes.h5ad" in err[0]
    assert not (tmp_path / "out" / "summary.json").exists()
    c = MlflowClient(mlflow_server["uri"])
    exp = c.get_experiment_by_name("cellpuzzles")
    failed = c.search_runs([exp.experiment_id], "tags.`pipeline.state` = 'FAILED'")
    assert failed and "notes.h5ad" in failed[0].data.tags["pipeline.error"]
    assert failed[0].info.status == "FAILED"


def test_server_down_is_one_clear_line_before_any_step(tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}
    r = subprocess.run([sys.executable, "-m", "cellpuzzles.cli", "run", "--out", "out"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: MLflow tracking server") and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "pipeline").exists()

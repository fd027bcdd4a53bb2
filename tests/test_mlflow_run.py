"""The whole main job, CI-sized, logging to a real `mlflow server` on 127.0.0.1."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{d}/mlflow.db",
         "--artifacts-destination", str(d / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=open(d / "server.log", "w"), stderr=subprocess.STDOUT,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2):
                break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("mlflow server did not start:\n" + (d / "server.log").read_text()[-2000:])
            time.sleep(0.5)
    yield uri
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def tracked_run(mlflow_server, tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    for name in ("data.dvc", ".dvcignore"):
        shutil.copy(ROOT / name, work / name)
    shutil.copytree(ROOT / ".dvc", work / ".dvc", ignore=shutil.ignore_patterns("cache", "tmp"))
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
    r = subprocess.run([sys.executable, "-m", "cellpuzzles.cli", "run", "--out", "out", "--sft-steps", "8",
                        "--rl-steps", "1", "--eval-limit", "6"], cwd=work, env=env, capture_output=True,
                       text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return work, r


def test_summary_has_every_model_and_mode(tracked_run):
    work, _ = tracked_run
    s = json.loads((work / "out" / "summary.json").read_text())
    assert {"random", "markers", "untrained", "sft", "rl-grpo", "rl-ppo"} <= set(s["models"])
    for name in ("untrained", "sft", "rl-grpo", "rl-ppo"):
        free, cons = s["models"][name]["free"], s["models"][name]["constrained"]
        for m in (free, cons):
            assert {"cell_accuracy", "batch_accuracy", "format_ratio", "uniqueness",
                    "batch_accuracy_ci", "cell_accuracy_ci"} <= set(m)
        assert cons["format_ratio"] == 1.0 and cons["uniqueness"] == 1.0
    for name in ("sft", "rl-grpo", "rl-ppo"):
        folder = Path(s["model_folders"][name])
        folder = folder if folder.is_absolute() else work / folder
        assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    assert s["data"]["dvc_md5"] and s["data"]["puzzle_files"]["test"]


def test_mlflow_has_parent_nested_runs_metrics_and_artifacts(tracked_run, mlflow_server):
    from mlflow.tracking import MlflowClient

    work, _ = tracked_run
    run_id = json.loads((work / "out" / "summary.json").read_text())["mlflow"]["parent_run_id"]
    c = MlflowClient(mlflow_server)
    parent = c.get_run(run_id)
    assert parent.data.tags["data.dvc_md5"].endswith(".dir")
    assert "learn.sft.max_steps" in parent.data.params
    children = c.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    by_name = {r.info.run_name: r for r in children}
    assert {"baselines", "distill", "untrained", "sft", "rl-grpo", "rl-ppo"} <= set(by_name)
    assert c.get_metric_history(by_name["sft"].info.run_id, "sft/loss")
    grpo = by_name["rl-grpo"].data.metrics
    assert {"rl_grpo/reward", "rl_grpo/kl", "rl_grpo/rewards/format_ok/mean", "rl_grpo/val_batch_accuracy"} <= set(grpo)
    assert {"rl_ppo/objective/kl", "rl_ppo/format_ratio", "rl_ppo/reward_mean"} <= set(by_name["rl-ppo"].data.metrics)
    assert "constrained/batch_accuracy" in by_name["sft"].data.metrics
    assert 0.2 < by_name["distill"].data.metrics["acceptance_rate"] <= 1.0
    model_files = {a.path for a in c.list_artifacts(by_name["sft"].info.run_id, "model")}
    assert {"model/config.json", "model/tokenizer.json", "model/cellpuzzles.json"} <= model_files
    plots = {a.path for a in c.list_artifacts(run_id, "plots")}
    assert {"plots/accuracy_by_n.png", "plots/confusion.png", "plots/sft_curves.png"} <= plots


def test_server_down_is_one_clear_line_before_training(tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{_free_port()}"}
    r = subprocess.run([sys.executable, "-m", "cellpuzzles.cli", "run", "--out", "out"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: MLflow tracking server") and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "models").exists()

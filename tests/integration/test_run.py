"""The main job and the data commands, end to end through the real CLI on the bundled data."""

import json
import shutil
import subprocess

import pytest

from helpers.cli import run_cli
from helpers.paths import ROOT

pytestmark = pytest.mark.slow  # each test runs several CLI commands on real data (seconds to a minute)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The data half of the main job through the step commands: prepare, puzzles, baselines."""
    work = tmp_path_factory.mktemp("work")
    r = run_cli("prepare", cwd=work)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli("puzzles", "data/pbmc68k_reduced.h5ad", "--out", "out/puzzles", "--cells-out", "out/cells.parquet",
                "--reasoning-fraction", "0.5", cwd=work)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli("evaluate", "--puzzles", "out/puzzles", "--solver", "random", "--solver", "markers",
                "--out", "out/eval", "--json", cwd=work)
    assert r.returncode == 0, r.stderr[-2000:]
    return work, r


def test_puzzles_and_baselines_on_the_bundled_data(default_run):
    work, r = default_run
    out = work / "out"
    assert (out / "puzzles" / "validation" / "data_docs" / "index.html").is_file()
    assert (out / "cells.parquet").is_file()
    s = json.loads((out / "puzzles" / "summary.json").read_text())
    assert s["splits"]["train"]["puzzles"] > 0 and s["splits"]["test"]["puzzles"] > 0
    rnd = json.loads((out / "eval" / "metrics_random.json").read_text())
    mk = json.loads((out / "eval" / "metrics_markers.json").read_text())
    for m in (rnd, mk):
        assert set(m) >= {"cell_accuracy", "batch_accuracy", "format_ratio", "uniqueness", "n",
                          "batch_accuracy_ci", "cell_accuracy_ci"}
        assert m["format_ratio"] == 1.0 and m["uniqueness"] == 1.0
    # the marker solver is far above chance: its interval clears random's
    assert mk["batch_accuracy_ci"][0] > rnd["batch_accuracy_ci"][1]


def test_evaluate_cli_scores_saved_predictions(default_run):
    work, _ = default_run
    preds = work / "out" / "eval" / "predictions_markers.jsonl"
    r = run_cli("evaluate", "--puzzles", "out/puzzles/test.jsonl", "--predictions", preds, "--json", cwd=work)
    assert r.returncode == 0, r.stderr
    saved = json.loads((work / "out" / "eval" / "metrics_markers.json").read_text())
    assert f"{saved['batch_accuracy']:.3f}" in r.stdout
    r = run_cli("evaluate", "--puzzles", "out/puzzles", "--solver", "random", "--solver", "markers", cwd=work)
    assert r.returncode == 0 and "markers" in r.stdout and "random" in r.stdout and "by N" in r.stdout


def test_validate_and_puzzles_cli_with_column_map(default_run, tmp_path):
    import anndata as ad

    work, _ = default_run
    a = ad.read_h5ad(work / "data" / "pbmc68k_reduced.h5ad")
    a.obs = a.obs.rename(columns={"cell_type": "bulk_labels", "donor_id": "donor"})
    a.write_h5ad(tmp_path / "renamed.h5ad")
    m = ["--map", "cell_type=bulk_labels", "--map", "donor_id=donor"]
    r = run_cli("validate", tmp_path / "renamed.h5ad", "--out", tmp_path / "v", *m)
    assert r.returncode == 0, r.stderr
    assert "24/24 passed" in r.stdout
    r = run_cli("puzzles", tmp_path / "renamed.h5ad", "--out", tmp_path / "p", "--n-max", "6",
                "--train-per-n", "20", "--test-per-n", "5", "--reasoning-fraction", "0.25", *m)
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert set(s["splits"]) == {"train", "test", "reasoning"}
    assert s["splits"]["test"]["by_n"] == {str(n): 5 for n in range(3, 7)}


def test_committed_data_dvc_matches_a_fresh_materialisation(tmp_path):
    """On a fresh checkout, `cellpuzzles prepare` reproduces the bytes data.dvc records."""
    for name in ("data.dvc", ".dvcignore"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / ".dvc", tmp_path / ".dvc", ignore=shutil.ignore_patterns("cache", "tmp"))
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    r = run_cli("prepare", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "matches data.dvc" in r.stdout
    st = subprocess.run(["dvc", "status"], cwd=tmp_path, capture_output=True, text=True)
    assert "up to date" in st.stdout, st.stdout + st.stderr
    # a changed input is noticed, not silently re-cached
    (tmp_path / "data" / "extra.txt").write_text("x")
    r = run_cli("prepare", cwd=tmp_path)
    assert "differs" in r.stderr


def test_synthetic_multi_donor_file_through_every_command(tmp_path):
    f = tmp_path / "syn.h5ad"
    r = run_cli("synth", "--cells", "3000", "--genes", "300", "--donors", "5", "--types", "8", "--out", f)
    assert r.returncode == 0, r.stderr
    r = run_cli("validate", f, "--out", tmp_path / "v")
    assert r.returncode == 0, r.stderr
    r = run_cli("puzzles", f, "--out", tmp_path / "p", "--split-by", "donor", "--n-max", "6",
                "--train-per-n", "40", "--test-per-n", "10", "--exclude", "^MT-", "--exclude", "^RP[SL]")
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "p" / "summary.json").read_text())
    train_donors, test_donors = set(s["splits"]["train"]["by_donor"]), set(s["splits"]["test"]["by_donor"])
    assert len(train_donors) >= 2 and test_donors and not train_donors & test_donors
    first = json.loads((tmp_path / "p" / "test.jsonl").read_text().splitlines()[0])
    assert "Sex: unknown" not in first["user_msg"] and "tissue: " in first["user_msg"]
    assert not any(g.startswith(("MT-", "RPL", "RPS")) for cell in first["genes"] for g in cell)
    r = run_cli("evaluate", "--puzzles", tmp_path / "p", "--solver", "markers", "--solver", "random",
                "--out", tmp_path / "e", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    mk = json.loads((tmp_path / "e" / "metrics_markers.json").read_text())
    rnd = json.loads((tmp_path / "e" / "metrics_random.json").read_text())
    assert mk["batch_accuracy"] > rnd["batch_accuracy"]

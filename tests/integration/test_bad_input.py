"""Bad inputs through the real CLI: one clear line on stderr, a non-zero exit, no traceback,
and nothing half-written in the output folder.

Every case is a real file written with anndata/h5py (or a real option) and a real
``python -m cellpuzzles.cli.main`` subprocess. The subprocesses are independent, so the module
fixture runs them all at once (one per core) and each test checks its own result.
"""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.sparse as sp

from cellpuzzles.task.puzzle import make_puzzle, write_puzzles

from helpers.cli import run_cli
from helpers.data import make_adata

pytestmark = pytest.mark.slow  # the module fixture runs ~25 CLI subprocesses (a minute on 2 cores)

# ---------------------------------------------------------------- bad files


def _write(a, path: Path) -> None:
    a.write_h5ad(path)


def f_not_hdf5(p: Path) -> None:
    p.write_text("cell_id,cell_type\nc1,B cell\n")


def f_truncated(p: Path) -> None:
    make_adata().write_h5ad(p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def f_no_cell_type(p: Path) -> None:
    a = make_adata()
    del a.obs["cell_type"]
    _write(a, p)


def f_no_donor(p: Path) -> None:
    a = make_adata()
    del a.obs["donor_id"]
    _write(a, p)


def f_bad_labels(p: Path) -> None:
    a = make_adata()
    ct = a.obs["cell_type"].astype(object)
    ct.iloc[0], ct.iloc[9], ct.iloc[17] = None, "", "  "  # NaN, empty, whitespace only
    a.obs["cell_type"] = ct
    _write(a, p)


def f_neg_counts_layer(p: Path) -> None:
    a = make_adata()
    counts = a.X.copy()
    counts.data[3] = -2.0
    a.layers["counts"] = counts
    _write(a, p)


def f_neg_raw(p: Path) -> None:
    a = make_adata()
    raw = a.copy()
    raw.X.data[3] = -2.0
    a.raw = raw
    _write(a, p)


def f_nan_counts(p: Path) -> None:
    a = make_adata()
    counts = a.X.copy()
    counts.data[3] = np.nan
    a.layers["counts"] = counts
    _write(a, p)


def f_scaled_x(p: Path) -> None:
    a = make_adata()
    x = a.X.toarray()
    a.X = ((x - x.mean(0)) / (x.std(0) + 1)).astype(np.float32)  # z-scored: negatives, no counts kept
    assert a.raw is None and not a.layers
    _write(a, p)


def f_duplicate_ids(p: Path) -> None:
    make_adata().write_h5ad(p)
    with h5py.File(p, "r+") as f:  # patch the stored obs index: cell 1 gets cell 0's id
        index = f["obs"][f["obs"].attrs["_index"]]
        index[1] = index[0]


def f_two_types_per_donor(p: Path) -> None:
    _write(make_adata(types=["B cell", "T cell"]), p)


def f_good(p: Path) -> None:
    _write(make_adata(), p)


FILES = {
    "notes.h5ad": f_not_hdf5,
    "truncated.h5ad": f_truncated,
    "no_cell_type.h5ad": f_no_cell_type,
    "no_donor.h5ad": f_no_donor,
    "bad_labels.h5ad": f_bad_labels,
    "neg_counts.h5ad": f_neg_counts_layer,
    "neg_raw.h5ad": f_neg_raw,
    "nan_counts.h5ad": f_nan_counts,
    "scaled.h5ad": f_scaled_x,
    "dup_ids.h5ad": f_duplicate_ids,
    "two_types.h5ad": f_two_types_per_donor,
    "good.h5ad": f_good,
}

# ------------------------------------------------------- bad puzzle / prediction files

GOOD_PUZZLES = [
    make_puzzle(genes=[["CD79A", "MS4A1"], ["CD3E", "IL7R"], ["NKG7", "GNLY"]],
                types=["B cell", "T cell", "NK cell"], context={"tissue": "blood"}, donor_id="d1",
                cell_ids=["c1", "c2", "c3"]),
    make_puzzle(genes=[["CD3E"], ["LYZ"], ["CD79A"]], types=["T cell", "monocyte", "B cell"],
                context={"tissue": "blood"}, donor_id="d2", cell_ids=["c4", "c5", "c6"]),
]


def write_text_files(d: Path) -> None:
    write_puzzles(d / "good.jsonl", GOOD_PUZZLES)
    good = (d / "good.jsonl").read_text().splitlines()
    rec = json.loads(good[1])
    del rec["user_msg"]
    (d / "puzzles_bad_json.jsonl").write_text(good[0] + "\n" + '{"system_msg": "x", "user_msg": \n')
    (d / "puzzles_bad_record.jsonl").write_text(good[0] + "\n" + json.dumps(rec) + "\n")
    (d / "puzzles_not_object.jsonl").write_text(good[0] + "\n" + "[1, 2, 3]\n")
    (d / "puzzles_empty.jsonl").write_text("")
    pid = GOOD_PUZZLES[0].puzzle_id
    ok = json.dumps({"puzzle_id": pid, "completion": "<think>x</think>\n<answer>B cell | T cell | NK cell</answer>"})
    (d / "preds_bad_json.jsonl").write_text(ok + "\n" + "{'puzzle_id': 'single quotes'}\n")
    (d / "preds_bad_fields.jsonl").write_text(ok + "\n" + json.dumps({"id": pid, "text": "B cell"}) + "\n")
    (d / "preds_empty.jsonl").write_text("\n\n")


# ------------------------------------------------------------------------- cases
# (id, CLI args with {d} = the data folder, expected exit code, texts the error must contain,
#  output folder that must stay free of results, or None)

PZ = ("--train-per-n", "5", "--test-per-n", "2")
CASES = [
    ("not_hdf5", ["puzzles", "{d}/notes.h5ad", "--out", "{d}/o_not_hdf5", *PZ], 2,
     ["notes.h5ad", "HDF5"], "o_not_hdf5"),
    ("truncated", ["puzzles", "{d}/truncated.h5ad", "--out", "{d}/o_truncated", *PZ], 2,
     ["truncated.h5ad", "truncated"], "o_truncated"),
    ("no_cell_type", ["puzzles", "{d}/no_cell_type.h5ad", "--out", "{d}/o_no_cell_type", *PZ], 2,
     ["no_cell_type.h5ad", "'cell_type'", "--map cell_type="], "o_no_cell_type"),
    ("no_donor", ["puzzles", "{d}/no_donor.h5ad", "--out", "{d}/o_no_donor", *PZ], 2,
     ["no_donor.h5ad", "'donor_id'", "--map donor_id="], "o_no_donor"),
    ("bad_labels", ["puzzles", "{d}/bad_labels.h5ad", "--out", "{d}/o_bad_labels", *PZ], 3,
     ["bad_labels.h5ad", "expect_column_values_to_not_be_null(cell_type)",
      "expect_column_values_to_not_match_regex(cell_type"], "o_bad_labels"),
    ("neg_counts_layer", ["puzzles", "{d}/neg_counts.h5ad", "--out", "{d}/o_neg_counts", *PZ], 3,
     ["neg_counts.h5ad", "expect_column_min_to_be_between(min_value"], "o_neg_counts"),
    ("neg_raw", ["puzzles", "{d}/neg_raw.h5ad", "--out", "{d}/o_neg_raw", *PZ], 3,
     ["neg_raw.h5ad", "expect_column_min_to_be_between(min_value"], "o_neg_raw"),
    ("nan_counts", ["puzzles", "{d}/nan_counts.h5ad", "--out", "{d}/o_nan_counts", *PZ], 3,
     ["nan_counts.h5ad", "expect_column_max_to_be_between(n_nonfinite"], "o_nan_counts"),
    ("scaled_x", ["puzzles", "{d}/scaled.h5ad", "--out", "{d}/o_scaled", *PZ], 2,
     ["scaled.h5ad", "scaled", "counts"], "o_scaled"),
    ("duplicate_ids", ["puzzles", "{d}/dup_ids.h5ad", "--out", "{d}/o_dup_ids", *PZ], 3,
     ["dup_ids.h5ad", "expect_column_values_to_be_unique(cell_id)"], "o_dup_ids"),
    ("no_usable_donor", ["puzzles", "{d}/two_types.h5ad", "--out", "{d}/o_two_types", *PZ], 3,
     ["two_types.h5ad", "n_types", "min_value=3"], "o_two_types"),
    ("impossible_n", ["puzzles", "{d}/good.h5ad", "--out", "{d}/o_n9", "--n-min", "9", *PZ,
                      "--cells-out", "{d}/o_n9/cells.parquet"], 2,
     ["--n-min", "9", "5 type(s)"], "o_n9"),
    ("map_unknown_column", ["puzzles", "{d}/good.h5ad", "--out", "{d}/o_map_col", "--map", "cell_type=nope", *PZ], 2,
     ["--map cell_type=nope", "good.h5ad", "'nope'"], "o_map_col"),
    ("map_unknown_field", ["puzzles", "{d}/good.h5ad", "--out", "{d}/o_map_field", "--map", "colour=x", *PZ], 2,
     ["--map", "colour=x", "unknown field 'colour'"], "o_map_field"),
    ("map_malformed", ["cells", "{d}/good.h5ad", "--out", "{d}/o_map_eq/cells.parquet", "--map", "cell_type"], 2,
     ["--map", "cell_type", "=COLUMN"], "o_map_eq"),
    ("validate_missing_file", ["validate", "{d}/missing.h5ad", "--out", "{d}/o_missing"], 2,
     ["missing.h5ad", "not found"], "o_missing"),
    ("run_not_hdf5", ["run", "--data", "{d}/notes.h5ad", "--out", "{d}/o_run_not_hdf5"], 2,
     ["notes.h5ad", "HDF5"], "o_run_not_hdf5"),
    ("run_map_unknown_column", ["run", "--data", "{d}/good.h5ad", "--map", "donor_id=patient",
                                "--out", "{d}/o_run_map"], 2,
     ["--map donor_id=patient", "'patient'"], "o_run_map"),
    ("eval_puzzles_bad_json", ["evaluate", "--puzzles", "{d}/puzzles_bad_json.jsonl",
                               "--predictions", "{d}/preds_bad_json.jsonl"], 2,
     ["puzzles_bad_json.jsonl", ":2:", "JSON"], None),
    ("eval_puzzles_bad_record", ["evaluate", "--puzzles", "{d}/puzzles_bad_record.jsonl", "--solver", "random",
                                 "--train", "{d}/good.jsonl"], 2,
     ["puzzles_bad_record.jsonl", "line 2", "user_msg"], None),
    ("eval_puzzles_not_object", ["evaluate", "--puzzles", "{d}/puzzles_not_object.jsonl",
                                 "--predictions", "{d}/preds_empty.jsonl"], 2,
     ["puzzles_not_object.jsonl", "line 2", "JSON object"], None),
    ("eval_puzzles_empty", ["evaluate", "--puzzles", "{d}/puzzles_empty.jsonl", "--predictions", "{d}/preds_empty.jsonl"], 2,
     ["puzzles_empty.jsonl", "empty"], None),
    ("eval_preds_bad_json", ["evaluate", "--puzzles", "{d}/good.jsonl", "--predictions", "{d}/preds_bad_json.jsonl"], 2,
     ["preds_bad_json.jsonl", ":2:", "JSON"], None),
    ("eval_preds_bad_fields", ["evaluate", "--puzzles", "{d}/good.jsonl", "--predictions", "{d}/preds_bad_fields.jsonl"], 2,
     ["preds_bad_fields.jsonl", ":2:", "puzzle_id", "completion"], None),
    ("eval_preds_empty", ["evaluate", "--puzzles", "{d}/good.jsonl", "--predictions", "{d}/preds_empty.jsonl"], 2,
     ["preds_empty.jsonl", "empty"], None),
]
CASE_IDS = [c[0] for c in CASES]
RESULT_FILES = ("train.jsonl", "test.jsonl", "reasoning.jsonl", "summary.json", "cells.parquet")


def _warm_numba_cache() -> None:
    """Compile the top-K kernel once here (numba caches it on disk), so the parallel
    subprocesses below load it instead of each compiling it."""
    from cellpuzzles.data.topk import TopK

    TopK(["a", "b", "c"], 2)(sp.csr_matrix(np.ones((2, 3), dtype=np.float32)))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    for name, make in FILES.items():
        make(d / name)
    write_text_files(d)
    _warm_numba_cache()
    runs = {cid: [a.replace("{d}", str(d)) for a in args] for cid, args, *_ in CASES}
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        futures = {cid: pool.submit(run_cli, *args, cwd=d) for cid, args in runs.items()}
        return d, {cid: f.result() for cid, f in futures.items()}


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_bad_input_gives_one_clear_line(results, case):
    cid, _, code, must_contain, out_name = case
    d, res = results
    r = res[cid]
    shown = f"rc={r.returncode}\nstdout:\n{r.stdout[-1500:]}\nstderr:\n{r.stderr[-3000:]}"
    assert r.returncode == code, shown
    assert "Traceback" not in r.stdout + r.stderr, shown
    lines = r.stderr.splitlines()
    assert len(lines) == 1, f"stderr must be exactly one line\n{shown}"
    msg = lines[0]
    assert msg.startswith("error: ") and len(msg) > len("error: ") + 10, shown
    for text in must_contain:
        assert text.lower() in msg.lower(), f"{text!r} not in {msg!r}"
    if out_name is not None:
        out = d / out_name
        if out.exists():
            left = sorted(p.relative_to(out).as_posix() for p in out.rglob("*")
                          if p.name in RESULT_FILES or p.name.endswith(".tmp") or p.name.startswith(".puzzles."))
            assert not left, f"a failed run left results behind: {left}"
            assert not (out / "puzzles").exists() and not (out / "eval").exists()


def test_validation_failure_keeps_the_report_on_stdout(results):
    """The failed expectations are listed on stdout (the data docs say more); stderr stays one line."""
    _, res = results
    r = res["neg_raw"]
    assert "FAIL cells.expect_column_min_to_be_between(min_value" in r.stdout
    assert "matrix raw/X" in r.stdout  # raw.X was chosen over X, and its negative value was caught
    r = res["no_usable_donor"]
    assert "unusable group 'd1': 2 type(s)" in r.stdout


def test_validation_summary_names_the_failure(results):
    d, _ = results
    summary = json.loads((d / "o_dup_ids" / "validation" / "validation.json").read_text())
    assert summary["success"] is False
    assert any("expect_column_values_to_be_unique(cell_id)" in f for f in summary["failed"])
    summary = json.loads((d / "o_nan_counts" / "validation" / "validation.json").read_text())
    assert summary["matrix"] == "layers/counts"


def test_messages_are_distinct_per_problem(results):
    """Each problem gets its own message, not one generic 'bad file'."""
    _, res = results
    msgs = {cid: res[cid].stderr.strip() for cid in CASE_IDS}
    own = [m for cid, m in msgs.items() if not cid.startswith("run_")]  # `run` repeats inputs of `puzzles`
    assert len(set(own)) == len(own)
    # same input, same message, whichever command; `run` names the pipeline step that failed
    assert msgs["run_not_hdf5"].startswith("error: pipeline failed at step validate: ")
    assert msgs["not_hdf5"].removeprefix("error: ") in msgs["run_not_hdf5"]
    assert re.search(r"X has negative values \(scaled data\)", msgs["scaled_x"])

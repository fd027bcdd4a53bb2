"""Puzzle sampling and splits (library level): determinism, no leakage, puzzle shape, counts,
skipped N, batches, context, and the written files."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import numpy as np
import pytest

from cellpuzzles.core.errors import CellPuzzlesError
from cellpuzzles.data.cells import CellsOptions, build_cells
from cellpuzzles.data.sample import PuzzleOptions, make_splits, write_splits
from cellpuzzles.task.puzzle import parse_context, read_puzzles

from helpers.data import TYPES, make_adata

OPTS = dict(n_min=3, n_max=7, train_per_n=20, test_per_n=10, reasoning_fraction=0.0)


def _cells(tmp_path_factory, adata, name="cells"):
    path = tmp_path_factory.mktemp(name) / "cells.h5ad"
    adata.write_h5ad(path)
    return build_cells(path, CellsOptions(top_k=8, progress=False))


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    """3 donors x 5 types x 8 cells; donor context differs (sex, tissue, disease)."""
    a = make_adata(donors=("d1", "d2", "d3"))
    a.obs["tissue"] = np.where(a.obs["donor_id"] == "d3", "lung", "blood")
    a.obs["disease"] = np.where(a.obs["donor_id"] == "d2", "influenza", "normal")
    return _cells(tmp_path_factory, a)


@pytest.fixture(scope="module")
def split(cells):
    return make_splits(cells, PuzzleOptions(**OPTS, seed=1))


def _records(splits):
    return {name: [p.to_record() for p in ps] for name, ps in splits.items()}


def _cell_ids(puzzles):
    return {c for p in puzzles for c in p.cell_ids}


# ------------------------------------------------------------------ determinism


def test_same_seed_same_puzzles_other_seed_other_puzzles(cells, split):
    again, summary_again = make_splits(cells, PuzzleOptions(**OPTS, seed=1))
    assert _records(again) == _records(split[0])
    assert summary_again == split[1]
    other, _ = make_splits(cells, PuzzleOptions(**OPTS, seed=2))
    assert [p.puzzle_id for p in other["test"]] != [p.puzzle_id for p in split[0]["test"]]
    assert {p.puzzle_id for p in other["train"]} != {p.puzzle_id for p in split[0]["train"]}


# ------------------------------------------------------------------ leakage


def test_cells_split_keeps_test_cells_out_of_training(cells):
    splits, summary = make_splits(cells, PuzzleOptions(**{**OPTS, "reasoning_fraction": 0.3}, seed=3))
    test_cells = _cell_ids(splits["test"])
    assert test_cells and not test_cells & _cell_ids(splits["train"])
    assert not test_cells & _cell_ids(splits["reasoning"])
    # every (donor, type) keeps cells on both sides, so both splits see every donor
    assert set(summary["splits"]["test"]["by_donor"]) == {"d1", "d2", "d3"}
    assert set(summary["splits"]["train"]["by_donor"]) == {"d1", "d2", "d3"}
    assert summary["pool_cells"]["train"] + summary["pool_cells"]["test"] == len(cells)


def test_donor_split_holds_out_whole_donors(cells):
    splits, summary = make_splits(cells, PuzzleOptions(**OPTS, split_by="donor", test_fraction=0.34, seed=0))
    test_donors = {p.donor_id for p in splits["test"]}
    train_donors = {p.donor_id for p in splits["train"]}
    assert len(test_donors) == 1 and len(train_donors) == 2
    assert not test_donors & train_donors
    assert not _cell_ids(splits["test"]) & _cell_ids(splits["train"])
    assert set(summary["splits"]["test"]["by_donor"]) == test_donors


def test_donor_split_with_one_donor_is_a_clear_error(tmp_path_factory):
    one = _cells(tmp_path_factory, make_adata(donors=("solo",)), "one_donor")
    with pytest.raises(CellPuzzlesError, match=r"--split-by donor needs at least 2 donors.*has 1"):
        make_splits(one, PuzzleOptions(**OPTS, split_by="donor"))
    # the cells split still works on one donor
    splits, _ = make_splits(one, PuzzleOptions(**OPTS))
    assert {p.donor_id for p in splits["test"]} == {"solo"}


def test_reasoning_split_is_carved_from_train(cells, split):
    base = split[0]
    splits, summary = make_splits(cells, PuzzleOptions(**{**OPTS, "reasoning_fraction": 0.25}, seed=1))
    train_ids = [p.puzzle_id for p in splits["train"]]
    reason_ids = [p.puzzle_id for p in splits["reasoning"]]
    assert len(train_ids) + len(reason_ids) == len(base["train"])
    assert len(reason_ids) == round(0.25 * len(base["train"]))
    assert not set(train_ids) & set(reason_ids)
    assert set(train_ids) | set(reason_ids) == {p.puzzle_id for p in base["train"]}
    assert [p.puzzle_id for p in splits["test"]] == [p.puzzle_id for p in base["test"]]  # test untouched
    assert summary["splits"]["reasoning"]["puzzles"] == len(reason_ids)


# ------------------------------------------------------------------ puzzle shape


def test_every_puzzle_is_well_formed(cells, split):
    splits, _ = split
    obs = cells.obs.set_index("cell_id")
    row_of = {c: i for i, c in enumerate(cells.obs["cell_id"])}
    for name, ps in splits.items():
        ids = [p.puzzle_id for p in ps]
        assert len(set(ids)) == len(ids), f"{name}: repeated puzzles"
        for p in ps:
            assert p.n == len(p.candidates) == len(set(p.candidates)) == len(p.cell_ids)
            assert p.candidates == sorted(p.candidates)
            assert sorted(p.answer) == p.candidates
            cell_obs = obs.loc[p.cell_ids]
            assert set(cell_obs["donor_id"]) == {p.donor_id}  # one donor
            assert list(cell_obs["cell_type"]) == p.answer  # answer[i] is cell i's type
            assert p.genes == cells.gene_lists([row_of[c] for c in p.cell_ids])
            assert all(len(g) == 8 for g in p.genes)  # top_k=8 and every cell expresses > 8 genes


def test_counts_per_n_hit_the_target_and_big_n_is_skipped(split):
    splits, summary = split
    assert summary["n_values"] == [3, 4, 5]
    assert summary["skipped_n"] == [6, 7]  # only 5 types per donor
    assert Counter(p.n for p in splits["train"]) == {3: 20, 4: 20, 5: 20}
    assert Counter(p.n for p in splits["test"]) == {3: 10, 4: 10, 5: 10}
    assert summary["splits"]["train"]["by_n"] == {3: 20, 4: 20, 5: 20}


def test_counts_stop_at_what_the_data_allows(cells):
    # test pool: 2 cells per (donor, type) -> at most 3 donors x 2**5 distinct N=5 puzzles
    splits, _ = make_splits(cells, PuzzleOptions(n_min=5, n_max=5, train_per_n=5, test_per_n=500, reasoning_fraction=0.0, seed=0))
    n5 = [p for p in splits["test"] if p.n == 5]
    assert 0 < len(n5) <= 3 * 2**5
    assert len({tuple(sorted(p.cell_ids)) for p in n5}) == len(n5)


def test_impossible_n_range_is_a_clear_error(cells):
    with pytest.raises(CellPuzzlesError, match=r"N range 6-9 is impossible.*5 type\(s\).*--n-min"):
        make_splits(cells, PuzzleOptions(n_min=6, n_max=9))
    with pytest.raises(CellPuzzlesError, match="--n-min 1"):
        make_splits(cells, PuzzleOptions(n_min=1))
    with pytest.raises(CellPuzzlesError, match="--test-fraction"):
        make_splits(cells, PuzzleOptions(test_fraction=1.0))


# ------------------------------------------------------------------ batches and context


def test_batch_column_splits_groups(tmp_path_factory):
    a = make_adata(donors=("d1", "d2"))
    # alternate batches within every (donor, type): each donor+batch group has all 5 types
    a.obs["batch"] = ["b1" if i % 2 == 0 else "b2" for i in range(a.n_obs)]
    c = _cells(tmp_path_factory, a, "batched")
    batch_of = dict(zip(c.obs["cell_id"], c.obs["batch"]))
    splits, summary = make_splits(c, PuzzleOptions(**OPTS, seed=0))
    seen = set()
    for ps in splits.values():
        for p in ps:
            batches = {batch_of[x] for x in p.cell_ids}
            assert len(batches) == 1, f"puzzle {p.puzzle_id} mixes batches {batches}"
            seen |= {(p.donor_id, *batches)}
    assert seen == {("d1", "b1"), ("d1", "b2"), ("d2", "b1"), ("d2", "b2")}


def test_context_fields_reach_the_user_msg(cells, split):
    ctx_of = {"d1": dict(sex="female", tissue="blood", disease="normal"),
              "d2": dict(sex="male", tissue="blood", disease="influenza"),
              "d3": dict(sex="male", tissue="lung", disease="normal")}
    for p in split[0]["test"]:
        fields = parse_context(p.context)
        assert fields == {**ctx_of[p.donor_id], "development_stage": "40-year-old stage",
                          "self_reported_ethnicity": "unknown"}
        assert p.user_msg.startswith(f"Context: {p.context}\n\n")
        want = ctx_of[p.donor_id]
        assert f"Sex: {want['sex']};" in p.user_msg and f"tissue: {want['tissue']};" in p.user_msg
        assert f"disease: {want['disease']}." in p.user_msg


# ------------------------------------------------------------------ written files


def test_write_splits_summary_hashes_match_files(tmp_path, cells):
    splits, summary = make_splits(cells, PuzzleOptions(**{**OPTS, "reasoning_fraction": 0.2}, seed=5))
    out = write_splits(tmp_path / "p", splits, summary)
    written = json.loads((out / "summary.json").read_text())
    assert set(written["files"]) == {"train", "test", "reasoning"}
    for name, info in written["files"].items():
        data = (out / info["path"]).read_bytes()
        assert info["sha256"] == hashlib.sha256(data).hexdigest()
        assert len(data.splitlines()) == written["splits"][name]["puzzles"] == len(splits[name])
        back = read_puzzles(out / info["path"])
        assert [p.to_record() for p in back] == [p.to_record() for p in splits[name]]
    assert sorted(x.name for x in out.iterdir()) == ["reasoning.jsonl", "summary.json", "test.jsonl", "train.jsonl"]

    # a rewrite without a reasoning split removes the stale file; same data -> same bytes
    splits2, summary2 = make_splits(cells, PuzzleOptions(**OPTS, seed=5))
    write_splits(out, splits2, summary2)
    assert not (out / "reasoning.jsonl").exists()
    again = json.loads((out / "summary.json").read_text())
    assert again["files"]["test"]["sha256"] == written["files"]["test"]["sha256"]
    assert sorted(x.name for x in out.iterdir()) == ["summary.json", "test.jsonl", "train.jsonl"]


def test_fixture_types_are_the_candidates(split):
    assert {c for p in split[0]["train"] for c in p.candidates} == set(TYPES)

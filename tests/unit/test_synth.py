"""Synthetic CELLxGENE-style .h5ad generator: schema, structure, determinism, errors."""

from __future__ import annotations

import re

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cellpuzzles.core.errors import CellPuzzlesError
from cellpuzzles.data import synth
from cellpuzzles.data.synth import synthesize

OBS_COLS = ("donor_id", "cell_type", "tissue", "disease", "sex", "development_stage",
            "self_reported_ethnicity", "assay", "batch")
DONOR_FIXED = ("sex", "development_stage", "self_reported_ethnicity", "disease", "tissue")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    path = tmp_path_factory.mktemp("synth") / "small.h5ad"
    summary = synthesize(path, cells=3000, genes=300, donors=5, types=8, seed=7, chunk_size=1000)
    return path, summary, ad.read_h5ad(path)


def test_reads_back_in_memory_and_backed(small):
    path, summary, a = small
    assert a.shape == (3000, 300)
    b = ad.read_h5ad(path, backed="r")
    try:
        assert b.shape == (3000, 300)
        rows = b.X[10:20]
        assert sp.issparse(rows)
        np.testing.assert_array_equal(rows.toarray(), a.X[10:20].toarray())
    finally:
        b.file.close()
    with h5py.File(path, "r") as f:
        assert f.attrs["encoding-type"] == "anndata"
        assert f.attrs["encoding-version"] == "0.1.0"
        for key in ("X", "obs", "var", "obsm", "varm", "obsp", "varp", "layers", "uns"):
            assert key in f, key
        assert f["X"].attrs["encoding-type"] == "csr_matrix"
    assert summary == {
        "path": str(path), "cells": 3000, "genes": 300, "donors": 5, "types": a.obs["cell_type"].nunique(),
        "nnz": a.X.nnz, "density": a.X.nnz / (3000 * 300),
    }


def test_obs_columns_and_dtypes(small):
    _, _, a = small
    obs = a.obs
    for col in OBS_COLS:
        assert col in obs.columns, col
        assert isinstance(obs[col].dtype, pd.CategoricalDtype), col
        assert obs[col].notna().all(), col
    assert obs.index.is_unique
    assert all(isinstance(i, str) and re.fullmatch(r"syn-donor\d{2}-\d{6}", i) for i in obs.index)
    assert all(i.split("-")[1] == d for i, d in zip(obs.index, obs["donor_id"].astype(str)))
    assert all(re.fullmatch(r"\d+-year-old stage", s) for s in obs["development_stage"].cat.categories)
    assert set(obs["sex"].cat.categories) <= {"female", "male"}
    assert obs["cell_type"].str.contains("cell|platelet|monocyte").all()


def test_donor_fixed_metadata_and_types(small):
    _, _, a = small
    g = a.obs.groupby("donor_id", observed=True)
    for col in DONOR_FIXED:
        assert (g[col].nunique() == 1).all(), col
    assert (g["cell_type"].nunique() >= 3).all()
    # groups the pipeline uses (donor + batch) are donors here, so they too have >= 3 types
    assert (a.obs.groupby(["donor_id", "batch"], observed=True)["cell_type"].nunique() >= 3).all()
    # unequal proportions: the rarest type is much rarer than the commonest
    counts = a.obs["cell_type"].value_counts()
    assert counts.min() * 5 < counts.max()


def test_var_symbols(small):
    _, _, a = small
    assert all(re.fullmatch(r"ENSG\d{11}", i) for i in a.var.index)
    assert a.var.index.is_unique
    names = a.var["feature_name"].astype(str)
    assert names.is_unique
    assert names.str.startswith("MT-").sum() >= 2
    assert names.str.match(r"^RP[SL]").sum() >= 2
    assert names.str.startswith("SYNG").sum() > 100
    for sym in ("CD3E", "MS4A1", "NKG7", "LYZ", "CD14"):
        assert sym in set(names), sym


def test_counts_are_raw_integers_with_requested_density(small):
    _, summary, a = small
    X = a.X
    assert sp.issparse(X) and X.format == "csr"
    assert X.dtype == np.float32
    assert X.indptr.dtype == X.indices.dtype  # scipy needs matching index dtypes
    assert (X.data > 0).all()
    np.testing.assert_array_equal(X.data, np.round(X.data))
    assert 0.04 < summary["density"] < 0.06
    lib = np.asarray(X.sum(axis=1)).ravel()
    assert lib.min() >= 1
    assert np.percentile(lib, 95) > 2.5 * np.percentile(lib, 5)  # library sizes vary
    X.sum_duplicates()
    X.eliminate_zeros()  # fails if index dtypes disagree


def test_density_follows_argument(tmp_path):
    s = synthesize(tmp_path / "dense.h5ad", cells=500, genes=100, donors=2, types=4, density=0.3)
    assert 0.25 < s["density"] < 0.35


def test_markers_separate_types(small):
    _, _, a = small
    markers = a.uns["synthetic"]["markers"]
    names = pd.Index(a.var["feature_name"].astype(str))
    X = a.X.tocsr()
    norm = sp.diags(1.0 / np.asarray(X.sum(axis=1)).ravel()) @ X
    types = a.obs["cell_type"].astype(str).to_numpy()
    present = sorted(set(types))
    for t in present:
        idx = names.get_indexer(list(markers[t]))
        assert (idx >= 0).all()
        score = np.asarray(norm[:, idx].sum(axis=1)).ravel()
        means = {u: score[types == u].mean() for u in present}
        assert max(means, key=means.get) == t, (t, means)
    # real symbols mark their type too
    ms4a1 = np.asarray(norm[:, names.get_loc("MS4A1")].todense()).ravel()
    if "B cell" in present:
        assert ms4a1[types == "B cell"].mean() > 3 * ms4a1[types != "B cell"].mean()


def test_deterministic_for_a_seed(tmp_path):
    kw = dict(cells=700, genes=120, donors=3, types=5, seed=11)
    p1, p2, p3, p4 = (tmp_path / f"{i}.h5ad" for i in range(4))
    synthesize(p1, **kw)
    synthesize(p2, **kw)
    synthesize(p3, chunk_size=64, **kw)  # chunking does not change the data
    synthesize(p4, **{**kw, "seed": 12})
    assert p1.read_bytes() == p2.read_bytes()
    a1, a3, a4 = ad.read_h5ad(p1), ad.read_h5ad(p3), ad.read_h5ad(p4)
    pd.testing.assert_frame_equal(a1.obs, a3.obs)
    pd.testing.assert_frame_equal(a1.var, a3.var)
    for attr in ("data", "indices", "indptr"):
        np.testing.assert_array_equal(getattr(a1.X, attr), getattr(a3.X, attr))
    assert not (a1.X.shape == a4.X.shape and (a1.X != a4.X).nnz == 0)


@pytest.mark.parametrize(
    "kw, name",
    [
        (dict(cells=0), "cells"),
        (dict(genes=49), "genes"),
        (dict(donors=0), "donors"),
        (dict(types=2), "types"),
        (dict(density=0.0), "density"),
        (dict(density=1.0), "density"),
        (dict(density=-0.1), "density"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(cells=2.5), "cells"),
    ],
)
def test_bad_arguments(tmp_path, kw, name):
    out = tmp_path / "bad.h5ad"
    with pytest.raises(CellPuzzlesError) as e:
        synthesize(out, **kw)
    msg = str(e.value)
    assert "\n" not in msg and f"{name}=" in msg and "pass" in msg
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_failure_leaves_no_temp_file(tmp_path, monkeypatch):
    out = tmp_path / "x.h5ad"
    out.write_bytes(b"previous")

    calls = {"n": 0}
    real = synth._Model.block_csr

    def boom(self, b, cells):
        calls["n"] += 1
        if calls["n"] > 1:
            raise RuntimeError("disk on fire")
        return real(self, b, cells)

    monkeypatch.setattr(synth._Model, "block_csr", boom)
    monkeypatch.setattr(synth, "TALLY_PER_BLOCK", 60 * 100)  # 100-cell blocks: fail mid-append
    with pytest.raises(RuntimeError):
        synthesize(out, cells=400, genes=60, donors=2, types=3, chunk_size=1)
    assert calls["n"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.h5ad"]
    assert out.read_bytes() == b"previous"


def test_tiny_and_many_types(tmp_path):
    s = synthesize(tmp_path / "one.h5ad", cells=1, genes=50, donors=1, types=3)
    assert s["cells"] == 1 and ad.read_h5ad(tmp_path / "one.h5ad").shape == (1, 50)
    s = synthesize(tmp_path / "many.h5ad", cells=400, genes=60, donors=3, types=30)
    a = ad.read_h5ad(tmp_path / "many.h5ad")
    assert a.var["feature_name"].is_unique
    assert any(str(c).startswith("synthetic cell type") for c in a.obs["cell_type"].cat.categories)
    assert (a.obs.groupby("donor_id", observed=True)["cell_type"].nunique() >= 3).all()

"""Reading .h5ad files into the cells table; validation on good data; assignment."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cellpuzzles.core.errors import CellPuzzlesError
from cellpuzzles.data.cells import Cells, CellsOptions, build_cells
from cellpuzzles.data.validate import validate_cells
from cellpuzzles.task.assign import assign, assign_labels

from helpers.data import make_adata


def brute_top(row: np.ndarray, names: list[str], k: int) -> list[str]:
    idx = [j for j in range(len(row)) if row[j] > 0]
    idx.sort(key=lambda j: (-row[j], names[j]))
    return [names[j] for j in idx[:k]]


def opts(**kw) -> CellsOptions:
    return CellsOptions(progress=False, **kw)


def test_top_genes_match_brute_force_and_chunking(h5ad_file):
    a = ad.read_h5ad(h5ad_file)
    dense = a.X.toarray()
    names = list(a.var["feature_name"])
    big = build_cells(h5ad_file, opts(top_k=12))
    small = build_cells(h5ad_file, opts(top_k=12, chunk_size=7))
    assert np.array_equal(big.top, small.top)
    for i in range(a.n_obs):
        assert big.gene_lists([i])[0] == brute_top(dense[i], names, 12)
    assert set(big.obs.columns) >= {"cell_id", "donor_id", "cell_type", "tissue", "sex", "n_expressed"}
    assert big.meta["matrix"] == "X"


def test_counts_layer_wins_over_raw_and_x(tmp_path):
    a = make_adata()
    counts = a.X.copy()
    a.layers["counts"] = counts
    a.raw = a.copy()
    a.X = sp.csr_matrix(np.zeros(a.shape, dtype=np.float32))
    a.write_h5ad(tmp_path / "f.h5ad")
    c = build_cells(tmp_path / "f.h5ad", opts(top_k=5))
    assert c.meta["matrix"] == "layers/counts"
    assert all(len(g) == 5 for g in c.gene_lists(range(len(c))))


def test_raw_used_with_its_own_gene_names_when_x_is_scaled(tmp_path):
    a = make_adata()
    raw = a.copy()
    raw.var["feature_name"] = [f"RAW{i:03d}" for i in range(a.n_vars)]
    a.raw = raw
    a.X = sp.csr_matrix(a.X.toarray() - 1.0)  # scaled: negative values
    a.write_h5ad(tmp_path / "f.h5ad")
    c = build_cells(tmp_path / "f.h5ad", opts(top_k=5))
    assert c.meta["matrix"] == "raw/X"
    assert c.gene_lists([0])[0][0].startswith("RAW")


def test_dense_x_and_fewer_expressed_genes_than_k(tmp_path):
    a = make_adata(n_genes=60)
    x = a.X.toarray()
    x[0] = 0
    x[0, [3, 7]] = [2.0, 5.0]
    a.X = x  # dense matrix on disk
    a.write_h5ad(tmp_path / "f.h5ad")
    c = build_cells(tmp_path / "f.h5ad", opts(top_k=50))
    assert c.gene_lists([0])[0] == ["GENE007", "GENE003"]


def test_column_map_and_index_gene_names(tmp_path):
    a = make_adata()
    a.obs = a.obs.rename(columns={"cell_type": "bulk_labels", "donor_id": "patient"})
    a.var = pd.DataFrame(index=[f"SYM{i}" for i in range(a.n_vars)])  # no feature_name: index holds symbols
    a.write_h5ad(tmp_path / "f.h5ad")
    with pytest.raises(CellPuzzlesError, match="--map"):
        build_cells(tmp_path / "f.h5ad", opts())
    c = build_cells(tmp_path / "f.h5ad", opts(column_map={"cell_type": "bulk_labels", "donor_id": "patient"}))
    assert set(c.obs["cell_type"]) == {"B cell", "T cell", "NK cell", "monocyte", "dendritic cell"}
    assert c.gene_lists([0])[0][0].startswith("SYM")


def test_missing_context_columns_become_unknown(tmp_path):
    a = make_adata()
    a.obs = a.obs[["donor_id", "cell_type"]]
    a.write_h5ad(tmp_path / "f.h5ad")
    c = build_cells(tmp_path / "f.h5ad", opts())
    assert set(c.obs["tissue"]) == {"unknown"}


def test_exclusion_patterns(tmp_path):
    a = make_adata()
    a.var["feature_name"] = ["MT-" + n if i < 10 else n for i, n in enumerate(a.var["feature_name"])]
    a.write_h5ad(tmp_path / "f.h5ad")
    plain = build_cells(tmp_path / "f.h5ad", opts(top_k=10))
    excl = build_cells(tmp_path / "f.h5ad", opts(top_k=10, exclude=("^MT-",)))
    assert any(g.startswith("MT-") for gl in plain.gene_lists(range(len(plain))) for g in gl)
    assert not any(g.startswith("MT-") for gl in excl.gene_lists(range(len(excl))) for g in gl)


def test_parquet_round_trip(h5ad_file, tmp_path):
    c = build_cells(h5ad_file, opts(top_k=8))
    c.to_parquet(tmp_path / "cells.parquet")
    back = Cells.from_parquet(tmp_path / "cells.parquet")
    assert back.gene_lists(range(len(c))) == c.gene_lists(range(len(c)))
    pd.testing.assert_frame_equal(back.obs, c.obs)
    assert back.meta["top_k"] == 8
    assert not list(tmp_path.glob(".*tmp"))  # atomic write left no temp file


@pytest.mark.slow
def test_validation_passes_on_good_data_and_writes_docs(h5ad_file, tmp_path):
    report = validate_cells(build_cells(h5ad_file, opts()), tmp_path / "v")
    assert report.success, report.failed
    assert (tmp_path / "v" / "data_docs" / "index.html").is_file()
    assert (tmp_path / "v" / "validation.json").is_file()
    assert report.summary["usable_groups"] == 2 and report.unusable == []


@pytest.mark.slow
def test_donor_with_too_few_types_reported_not_dropped(tmp_path):
    a = ad.concat([make_adata(donors=("d1",)), make_adata(donors=("d2",), types=["B cell", "T cell"])])
    a.obs_names = [f"c{i}" for i in range(a.n_obs)]
    a.var["feature_name"] = [f"GENE{i:03d}" for i in range(a.n_vars)]
    a.write_h5ad(tmp_path / "f.h5ad")
    report = validate_cells(build_cells(tmp_path / "f.h5ad", opts()), tmp_path / "v")
    assert report.success
    assert [u["group"] for u in report.unusable] == ["d2"]
    assert "d2" in report.table()


def test_assign_is_optimal_permutation():
    s = np.array([[5.0, 9.0, 1.0], [4.0, 8.0, 2.0], [0.0, 7.0, 3.0]])
    perm = assign(s)
    assert sorted(perm) == [0, 1, 2]
    best = max(sum(s[i, p[i]] for i in range(3)) for p in __import__("itertools").permutations(range(3)))
    assert sum(s[i, perm[i]] for i in range(3)) == best
    assert assign_labels(np.array([[np.nan, 1.0], [0.0, -np.inf]]), ["x", "y"]) == ["y", "x"]
    with pytest.raises(ValueError):
        assign(np.ones((2, 3)))

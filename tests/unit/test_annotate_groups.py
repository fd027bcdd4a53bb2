"""annotate without a model: groups -> top genes (the training ranking), donor context, puzzle
plans, the assignment rules, the one-line errors, and the lazy `cellpuzzles.annotate`."""

import itertools
import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cellpuzzles.annotate.api import annotate, check_candidates
from cellpuzzles.annotate.assignment import assign_columns
from cellpuzzles.annotate.groups import ONE_DONOR, build_groups
from cellpuzzles.annotate.options import Assignment, default_assignment, parse_assignment
from cellpuzzles.annotate.plan import plan_donor
from cellpuzzles.core.errors import CellPuzzlesError


@pytest.fixture(scope="module")
def pbmc():
    import scanpy as sc

    return sc.datasets.pbmc68k_reduced()


def ranked(values: np.ndarray, names: np.ndarray, k: int) -> list[str]:
    """Top k by descending value, ties by name, positives only: written out plainly."""
    order = sorted((-v, str(n)) for v, n in zip(values, names) if v > 0)
    return [n for _, n in order[:k]]


@pytest.mark.slow
def test_group_genes_rank_the_mean_of_the_counts_matrix_like_training(pbmc):
    g = build_groups(pbmc, "louvain", 12)
    assert list(g.table["group"]) == list(pbmc.obs["louvain"].cat.categories)
    assert g.matrix == "raw/X" and g.table["donor"].eq(ONE_DONOR).all()
    raw = pbmc.raw.X.toarray() if sp.issparse(pbmc.raw.X) else np.asarray(pbmc.raw.X)
    for r, grp in enumerate(g.table["group"]):
        mask = (pbmc.obs["louvain"] == grp).to_numpy()
        assert g.table.loc[r, "n_cells"] == mask.sum()
        assert (g.cell_rows[mask] == r).all()
        assert g.genes[r] == ranked(raw[mask].mean(0), np.asarray(pbmc.raw.var_names), 12)


def test_counts_layer_wins_and_context_comes_from_obs_or_the_map():
    rng = np.random.default_rng(0)
    counts = rng.poisson(1.0, (40, 30)).astype(np.float32)
    obs = pd.DataFrame({"cl": pd.Categorical(["a", "b"] * 20), "who": ["d1"] * 20 + ["d2"] * 20,
                        "gender": ["female"] * 20 + ["male"] * 20, "tissue": "blood"},
                       index=[f"c{i}" for i in range(40)])
    x = ad.AnnData(X=rng.normal(size=(40, 30)).astype(np.float32), obs=obs,
                   var=pd.DataFrame(index=[f"G{j:02d}" for j in range(30)]))
    x.layers["counts"] = counts
    g = build_groups(x, "cl", 5, donor_key="who", column_map={"sex": "gender"})
    assert g.matrix == "layers/counts" and list(g.table["donor"]) == ["d1", "d1", "d2", "d2"]
    assert g.contexts["d2"]["sex"] == "male" and g.contexts["d1"]["tissue"] == "blood"
    assert g.contexts["d1"]["disease"] == "unknown"
    mask = ((obs["who"] == "d2") & (obs["cl"] == "b")).to_numpy()
    assert g.genes[3] == ranked(counts[mask].mean(0), np.asarray(x.var_names), 5)


@pytest.mark.parametrize("case, match", [
    ("groupby", "--groupby nope: obs has no column 'nope'"),
    ("scaled", "X has negative values"),
    ("empty", "group 'b' (donor 'all cells') has no expressed genes"),
    ("donor", "--donor-key who: obs has no column 'who'"),
])
def test_bad_groups_say_what_to_fix(case, match):
    X = np.abs(np.random.default_rng(1).normal(size=(6, 4))).astype(np.float32)
    if case == "empty":
        X[3:] = 0
    if case == "scaled":
        X[0, 0] = -1
    x = ad.AnnData(X=X, obs=pd.DataFrame({"cl": ["a"] * 3 + ["b"] * 3}, index=[f"c{i}" for i in range(6)]))
    with pytest.raises(CellPuzzlesError, match=match.replace("(", r"\(").replace(")", r"\)")):
        build_groups(x, "nope" if case == "groupby" else "cl", 3, donor_key="who" if case == "donor" else None)


def test_candidates_are_checked():
    assert check_candidates([" B cell", "T cell "]) == ["B cell", "T cell"]
    with pytest.raises(CellPuzzlesError, match="'t cell' is listed twice"):
        check_candidates(["T cell", "B cell", "t cell"])
    with pytest.raises(CellPuzzlesError, match="at least 2"):
        check_candidates(["T cell"])


@pytest.mark.slow
def test_fewer_candidates_than_groups_fails_before_any_model_loads(pbmc, tmp_path):
    cands = sorted(pbmc.obs["bulk_labels"].unique())  # 10 types for 11 clusters
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_text("{}")  # a folder that would not load: the check comes first
    with pytest.raises(CellPuzzlesError, match="11 groups but 10 candidates hold only 10 under one-to-one"):
        annotate(pbmc, cands, groupby="louvain", model=tmp_path, assignment="one-to-one")


def test_assignment_rules_are_parsed_and_defaulted():
    assert parse_assignment("capacity=3") == Assignment("capacity", 3)
    assert parse_assignment("capacity=1") == Assignment("one-to-one", 1)
    assert parse_assignment("Independent").name == "independent"
    for bad in ("capacity=0", "capacity=x", "many"):
        with pytest.raises(CellPuzzlesError, match="--assignment"):
            parse_assignment(bad)
    assert default_assignment(10, 10).name == "one-to-one"
    assert default_assignment(11, 10).name == "capacity=2"
    assert default_assignment(21, 10).name == "capacity=3"


def brute(scores: np.ndarray, cap: int) -> float:
    """Best total over every labelling in which no column is used more than cap times."""
    n, c = scores.shape
    best = -np.inf
    for cols in itertools.product(range(c), repeat=n):
        if max(np.bincount(cols, minlength=c)) <= cap:
            best = max(best, scores[np.arange(n), cols].sum())
    return best


@pytest.mark.parametrize("n, c, cap", [(3, 5, 1), (5, 5, 1), (5, 3, 2), (6, 3, 2), (4, 2, 3)])
def test_assignment_is_optimal_under_its_capacity(n, c, cap):
    s = np.random.default_rng(n * 10 + c).normal(size=(n, c))
    rule = Assignment("one-to-one", 1) if cap == 1 else Assignment("capacity", cap)
    cols = assign_columns(s, rule)
    assert max(np.bincount(cols, minlength=c)) <= cap
    assert np.isclose(s[np.arange(n), cols].sum(), brute(s, cap))
    assert (assign_columns(s, Assignment("independent", None)) == s.argmax(1)).all()


def test_a_donor_with_more_groups_than_fit_is_cut_into_square_puzzles():
    genes = [[f"G{r}"] for r in range(11)]
    pps = plan_donor("d", list(range(11)), genes, {}, [f"T{j}" for j in range(10)], size=10)
    assert [len(p.home) for p in pps] == [10, 1]
    assert all(p.puzzle.n == 10 == len(p.puzzle.candidates) for p in pps)  # the training shape
    assert sorted(r for p in pps for r in p.home) == list(range(11))  # every group answered once
    assert pps[1].rows[0] == 10 and set(pps[1].rows[1:]) <= set(range(10))  # fillers from the same donor
    small = plan_donor("d", [0, 1, 2], genes, {}, [f"T{j}" for j in range(10)], size=10)
    assert len(small) == 1 and small[0].puzzle.n == 3 and len(small[0].puzzle.candidates) == 10


def test_endpoint_names_match_the_server():
    from cellpuzzles.annotate import endpoint
    from cellpuzzles.serving.http import TOKEN_ENV
    from cellpuzzles.serving.protocol import MODEL_NAME

    assert (endpoint.TOKEN_ENV, endpoint.MODEL_NAME) == (TOKEN_ENV, MODEL_NAME)


@pytest.mark.slow
def test_cellpuzzles_annotate_is_the_function_and_importing_the_package_stays_light():
    code = ("import sys, cellpuzzles; heavy = {'torch', 'scanpy', 'requests'} & set(sys.modules); "
            "f = cellpuzzles.annotate; import cellpuzzles.annotate.api as api; "
            "print(sorted(heavy), callable(f), callable(cellpuzzles.annotate), api.annotate.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["[]", "True", "True", "annotate"]

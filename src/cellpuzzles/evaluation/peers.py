"""The tools a biologist would use instead of the model, and the ceiling of the model's input,
scored on the same test puzzles.

- ``logreg_alone``: a scikit-learn logistic regression on log-normalised expression (all genes),
  trained on exactly the train cells (those of the train and reasoning puzzles), each test cell
  labelled alone with its most probable candidate (the classifier's everyday use);
- ``logreg_1to1``: the same classifier's log-probabilities over each puzzle's candidates, assigned
  one-to-one (Hungarian, ``task.assign``): the classical peer the model must be shown beside;
- ``ceiling_top<K>``: the same classifier, one-to-one, on only what a prompt shows: each cell's
  top-K gene names, rank-weighted ((K - rank) / K), no expression values. The model shown K genes
  per cell sees no more than this.

Predictions are written as completions, so they are scored by the same metrics as the model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from cellpuzzles.core import atomic
from cellpuzzles.core.errors import CellPuzzlesError
from cellpuzzles.task.assign import assign
from cellpuzzles.task.puzzle import Puzzle, format_completion

EXPRESSION_FILE = "expression.h5ad"  # written beside cells.parquet by the validate step
ALONE, ONE_TO_ONE = "logreg_alone", "logreg_1to1"
PEER = ONE_TO_ONE  # the peer a model is judged against


def ceiling_name(k: int) -> str:
    return f"ceiling_top{k}"


@dataclass
class PeerOptions:
    """The classical peer: scikit-learn's LogisticRegression (lbfgs, multinomial)."""

    C: float = 1.0  # inverse regularisation strength
    max_iter: int = 2000


# -- expression -------------------------------------------------------------------------------

def _is_counts(x: sp.csr_matrix) -> bool:
    data = x.data[: 100_000]
    return bool(len(data)) and bool(np.all(data >= 0)) and bool(np.allclose(data, np.round(data)))


def write_expression(h5ad: str | os.PathLike, cell_ids: Sequence[str], out: str | os.PathLike,
                     column_map: dict | None = None) -> Path:
    """The log-normalised expression matrix of every cell (rows named by ``cell_ids``, in the
    cells table's order) as an .h5ad: counts are normalised to 10,000 per cell and log1p'd
    (scanpy); a matrix that is already non-integer (e.g. raw.X = log1p(CP10k)) is kept."""
    import anndata as ad
    import scanpy as sc

    from cellpuzzles.data.h5ad import H5ad

    with H5ad(h5ad, column_map) as h:
        x = sp.vstack([c for _, c in h.iter_chunks()]).tocsr().astype(np.float32)
        genes = [str(g) for g in h.matrix.genes]
    if x.shape[0] != len(cell_ids):
        raise CellPuzzlesError(f"{h5ad}: matrix has {x.shape[0]} rows for {len(cell_ids)} cells; re-export the file")
    a = ad.AnnData(X=x)
    a.obs_names, a.var_names = [str(c) for c in cell_ids], genes
    a.var_names_make_unique()
    if _is_counts(x):
        sc.pp.normalize_total(a, target_sum=1e4)
        sc.pp.log1p(a)
    with atomic.atomic_path(out) as tmp:
        a.write_h5ad(tmp)
    return Path(out)


def read_expression(path: str | os.PathLike):
    import anndata as ad

    path = Path(path)
    if not path.is_file():
        raise CellPuzzlesError(f"{path}: no expression matrix for the classical peer; rerun the validate step "
                               "(it writes it beside cells.parquet)")
    a = ad.read_h5ad(path)
    if not a.obs_names.is_unique:
        raise CellPuzzlesError(f"{path}: cell ids repeat; the peer needs one row per cell id")
    return a


# -- the classifier and its two uses -----------------------------------------------------------

def train_cells(train: Sequence[Puzzle]) -> dict[str, str]:
    """Cell id -> type over the train puzzles (each cell once)."""
    out: dict[str, str] = {}
    for p in train:
        for c, t in zip(p.cell_ids, p.answer):
            out.setdefault(c, t)
    if len(set(out.values())) < 2:
        raise CellPuzzlesError("the train puzzles hold fewer than 2 cell types; the classical peer needs more")
    return out


def _fit(features, labels: Sequence[str], opt: PeerOptions):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=opt.C, max_iter=opt.max_iter).fit(features, list(labels))


def _log_proba(clf, features, cell_ids: Sequence[str]) -> dict[str, np.ndarray]:
    lp = clf.predict_log_proba(features)
    return dict(zip(cell_ids, lp))


def _candidate_scores(p: Puzzle, lp: dict[str, np.ndarray], classes: list[str]) -> np.ndarray:
    """Cells x candidates log-probabilities; a candidate type unseen in training scores -inf."""
    col = {c.strip().lower(): j for j, c in enumerate(classes)}
    out = np.full((p.n, len(p.candidates)), -np.inf)
    for j, cand in enumerate(p.candidates):
        k = col.get(cand.strip().lower())
        if k is not None:
            out[:, j] = [lp[c][k] for c in p.cell_ids]
    return out


def _complete(test: Sequence[Puzzle], lp: dict[str, np.ndarray], classes: list[str], one_to_one: bool,
              note: str) -> list[str]:
    comps = []
    for p in test:
        s = _candidate_scores(p, lp, classes)
        pick = assign(s) if one_to_one else s.argmax(axis=1)
        comps.append(format_completion(note, [p.candidates[j] for j in pick]))
    return comps


def expression_completions(train: Sequence[Puzzle], test: Sequence[Puzzle], expression,
                           opt: PeerOptions | None = None) -> dict[str, list[str]]:
    """``{ALONE: completions, ONE_TO_ONE: completions}`` from the expression classifier."""
    opt = opt or PeerOptions()
    cells = train_cells(train)
    test_ids = list(dict.fromkeys(c for p in test for c in p.cell_ids))
    missing = [c for c in [*cells, *test_ids] if c not in expression.obs_names]
    if missing:
        raise CellPuzzlesError(f"cell {missing[0]!r} (and {len(missing) - 1} more) not in the expression matrix; "
                               "build the puzzles and the matrix from the same cells table")
    ids = list(cells)
    clf = _fit(expression[ids].X, [cells[c] for c in ids], opt)
    lp = _log_proba(clf, expression[test_ids].X, test_ids)
    classes = [str(c) for c in clf.classes_]
    return {ALONE: _complete(test, lp, classes, False, "Logistic regression on expression, each cell alone."),
            ONE_TO_ONE: _complete(test, lp, classes, True, "Logistic regression on expression, assigned one-to-one.")}


def gene_list_features(gene_lists: Sequence[Sequence[str]], vocab: dict[str, int], k: int) -> sp.csr_matrix:
    """Rank weights (k - rank) / k of each cell's first k listed genes; genes outside ``vocab`` dropped."""
    rows, cols, vals = [], [], []
    for r, genes in enumerate(gene_lists):
        for rank, g in enumerate(genes[:k]):
            if g in vocab:
                rows.append(r)
                cols.append(vocab[g])
                vals.append((k - rank) / k)
    return sp.csr_matrix((vals, (rows, cols)), shape=(len(gene_lists), len(vocab)))


def ceiling_completions(train: Sequence[Puzzle], test: Sequence[Puzzle], k: int,
                        opt: PeerOptions | None = None) -> list[str]:
    """One-to-one completions of the classifier trained on the top-k gene names the prompts list."""
    opt = opt or PeerOptions()
    lists: dict[str, tuple[str, list[str]]] = {}
    for p in train:
        for c, t, g in zip(p.cell_ids, p.answer, p.genes):
            lists.setdefault(c, (t, g))
    if len({t for t, _ in lists.values()}) < 2:
        raise CellPuzzlesError("the train puzzles hold fewer than 2 cell types; the input ceiling needs more")
    vocab = {g: i for i, g in enumerate(sorted({g for _, gs in lists.values() for g in gs[:k]}))}
    ids = list(lists)
    clf = _fit(gene_list_features([lists[c][1] for c in ids], vocab, k), [lists[c][0] for c in ids], opt)
    test_genes: dict[str, list[str]] = {}
    for p in test:
        for c, g in zip(p.cell_ids, p.genes):
            test_genes.setdefault(c, g)
    tids = list(test_genes)
    lp = _log_proba(clf, gene_list_features([test_genes[c] for c in tids], vocab, k), tids)
    return _complete(test, lp, [str(c) for c in clf.classes_], True,
                     f"Logistic regression on the top {k} gene names (rank-weighted), assigned one-to-one.")


def peer_completions(train: Sequence[Puzzle], test: Sequence[Puzzle], expression=None,
                     ceiling_k: Sequence[int] = (), opt: PeerOptions | None = None) -> dict[str, list[str]]:
    """Every peer's completions by name: the expression classifier (alone, one-to-one) when an
    expression matrix is given, and the input ceiling for each K."""
    out = expression_completions(train, test, expression, opt) if expression is not None else {}
    for k in sorted(set(ceiling_k)):
        out[ceiling_name(k)] = ceiling_completions(train, test, k, opt)
    return out


def evaluate_peers(train: Sequence[Puzzle], test: Sequence[Puzzle], expression=None, ceiling_k: Sequence[int] = (),
                   out_dir: str | os.PathLike | None = None, seed: int = 0, opt: PeerOptions | None = None) -> dict:
    """Every peer scored on the test puzzles like a model (intervals resample test cells); with
    ``out_dir``, ``predictions_<name>.jsonl`` and ``metrics_<name>.json`` as for the solvers."""
    from cellpuzzles.evaluation.compare import score_puzzles
    from cellpuzzles.evaluation.evaluate import write_predictions

    results = {}
    for name, comps in peer_completions(train, test, expression, ceiling_k, opt).items():
        results[name] = score_puzzles(test, comps, seed=seed)
        if out_dir is not None:
            write_predictions(Path(out_dir) / f"predictions_{name}.jsonl", test, comps)
            atomic.write_json(Path(out_dir) / f"metrics_{name}.json", results[name])
    return results


BASELINE_LABELS = {
    "random": "random assignment (chance)",
    "markers": "marker-gene solver (the project's teacher), one-to-one",
    ALONE: "logistic regression on expression, each cell alone",
    ONE_TO_ONE: "logistic regression on expression, one-to-one",
}


def describe(name: str) -> str:
    """What a baseline name stands for, for tables a reviewer reads."""
    if name.startswith("ceiling_top") and name.removeprefix("ceiling_top").isdigit():
        return f"logistic regression on the top {name.removeprefix('ceiling_top')} gene names (rank-weighted), one-to-one"
    return BASELINE_LABELS.get(name, name)


def ceiling_for(baselines: dict, genes_shown: int | None) -> str | None:
    """The ceiling name matching the genes a model is shown (None: every listed gene: the widest)."""
    ks = sorted(int(k.removeprefix("ceiling_top")) for k in baselines
                if k.startswith("ceiling_top") and k.removeprefix("ceiling_top").isdigit())
    if not ks:
        return None
    if genes_shown is not None and genes_shown in ks:
        return ceiling_name(genes_shown)
    return ceiling_name(ks[-1])

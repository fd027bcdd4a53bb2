"""An AnnData's groups (clusters) per donor, each described the way the model's cells were:
the top-K genes of the group's mean expression, ranked by the project's top-K kernel
(``cellpuzzles.data.topk``: descending value, ties by gene name) over the matrix the ingest
reads (``cellpuzzles.data.h5ad``: layers['counts'], else raw.X, else X), and the donor
context from obs (CELLxGENE columns, or a column map)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellpuzzles.core.errors import CellPuzzlesError
from cellpuzzles.data.h5ad import CONTEXT, UNKNOWN
from cellpuzzles.data.topk import TopK

ONE_DONOR = "all cells"  # the donor name when obs has no donor column


@dataclass
class Matrix:
    """The expression matrix the groups are ranked on, with its gene symbols and var names."""

    source: str  # "layers/counts", "raw/X" or "X" (the ingest's names)
    X: object  # cells x genes, dense or sparse
    genes: np.ndarray  # symbols shown to the model (var 'feature_name' when present)
    var_names: np.ndarray  # the matrix's var names (for scanpy plots)


@dataclass
class Groups:
    """One row per (donor, group): its cells, its top genes and its donor's context."""

    table: pd.DataFrame  # donor, group, n_cells (in donor order, then the groupby column's order)
    genes: list[list[str]]  # top-K gene symbols per row
    var_names: list[list[str]]  # the same genes as the matrix's var names
    contexts: dict[str, dict[str, str]]  # donor -> context fields
    cell_rows: np.ndarray  # per cell: its row in table (-1: no group)
    matrix: str
    donor_key: str | None

    def donors(self) -> list[str]:
        return list(dict.fromkeys(self.table["donor"]))


def counts_matrix(adata) -> Matrix:
    """The matrix the ingest ranks: layers['counts'], else raw.X, else X (not a scaled one)."""
    def symbols(var: pd.DataFrame) -> np.ndarray:
        names = var["feature_name"] if "feature_name" in var.columns else pd.Series(var.index, index=var.index)
        return np.asarray(names.astype(str), dtype=object)

    if "counts" in adata.layers:
        return Matrix("layers/counts", adata.layers["counts"], symbols(adata.var), np.asarray(adata.var_names, dtype=object))
    if adata.raw is not None:
        raw = adata.raw
        return Matrix("raw/X", raw.X, symbols(raw.var), np.asarray(raw.var_names, dtype=object))
    X = adata.X
    low = X.min() if sp.issparse(X) else np.nanmin(np.asarray(X)) if np.asarray(X).size else 0
    if low < 0:
        raise CellPuzzlesError("X has negative values (scaled data) and the AnnData has no counts "
                               "(layers['counts'] or raw.X); annotate the object that still holds its counts")
    return Matrix("X", X, symbols(adata.var), np.asarray(adata.var_names, dtype=object))


def donor_column(obs: pd.DataFrame, donor_key: str | None, column_map: dict[str, str]) -> str | None:
    if donor_key is not None:
        if donor_key not in obs.columns:
            raise CellPuzzlesError(f"--donor-key {donor_key}: obs has no column '{donor_key}'; "
                                   f"obs columns are: {', '.join(map(str, obs.columns))}")
        return donor_key
    col = column_map.get("donor_id", "donor_id")
    return col if col in obs.columns else None


def _categories(s: pd.Series) -> list[str]:
    """The column's values in its own order: categories as declared, else sorted."""
    if isinstance(s.dtype, pd.CategoricalDtype):
        return [str(c) for c in s.cat.categories if (s == c).any()]
    return sorted({str(v) for v in s.dropna()})


def build_groups(adata, groupby: str, top_k: int, donor_key: str | None = None,
                 column_map: dict[str, str] | None = None, exclude: Sequence[str] = ()) -> Groups:
    """Every (donor, group) of ``adata`` with its top-K genes; one-line errors for a missing
    column, a scaled matrix without counts or a group with no expressed genes."""
    cmap = dict(column_map or {})
    obs = adata.obs
    if groupby not in obs.columns:
        raise CellPuzzlesError(f"--groupby {groupby}: obs has no column '{groupby}'; "
                               f"obs columns are: {', '.join(map(str, obs.columns))}")
    for key, col in cmap.items():
        if col not in obs.columns:
            raise CellPuzzlesError(f"--map {key}={col}: obs has no column '{col}'; "
                                   f"obs columns are: {', '.join(map(str, obs.columns))}")
    dcol = donor_column(obs, donor_key, cmap)
    m = counts_matrix(adata)
    group = obs[groupby]
    donor = obs[dcol].astype(object).where(obs[dcol].notna(), None) if dcol else pd.Series(ONE_DONOR, index=obs.index)
    rows, cell_rows = [], np.full(adata.n_obs, -1, dtype=np.int64)
    gvals = group.astype(object).map(lambda v: None if pd.isna(v) else str(v)).to_numpy()
    dvals = donor.map(lambda v: None if v is None or pd.isna(v) else str(v)).to_numpy()
    order = _categories(group)
    for d in (_categories(obs[dcol]) if dcol else [ONE_DONOR]):
        in_donor = dvals == d
        for g in order:
            idx = np.flatnonzero(in_donor & (gvals == g))
            if len(idx):
                cell_rows[idx] = len(rows)
                rows.append((d, g, len(idx)))
    if not rows:
        raise CellPuzzlesError(f"--groupby {groupby}: no cell has a group; the column is empty")
    table = pd.DataFrame(rows, columns=["donor", "group", "n_cells"])
    # mean expression per row: a sparse (rows x cells) averaging matrix times the counts matrix
    have = np.flatnonzero(cell_rows >= 0)
    weights = 1.0 / table["n_cells"].to_numpy()[cell_rows[have]]
    avg = sp.csr_matrix((weights, (cell_rows[have], have)), shape=(len(table), adata.n_obs))
    X = m.X if sp.issparse(m.X) else np.asarray(m.X)
    means = sp.csr_matrix(avg @ X, dtype=np.float32)
    top, stats = TopK(m.genes, top_k, exclude)(means)
    empty = np.flatnonzero(stats["n_expressed"] == 0)
    if len(empty):
        d, g = table.iloc[empty[0]][["donor", "group"]]
        raise CellPuzzlesError(f"--groupby {groupby}: group '{g}' (donor '{d}') has no expressed genes in {m.source}; "
                               "drop the group or annotate the object that holds its counts")
    genes = [[str(m.genes[j]) for j in r if j >= 0] for r in top]
    var_names = [[str(m.var_names[j]) for j in r if j >= 0] for r in top]
    contexts = {d: _context(obs, dvals == d, cmap) for d in table["donor"].unique()}
    return Groups(table=table, genes=genes, var_names=var_names, contexts=contexts, cell_rows=cell_rows,
                  matrix=m.source, donor_key=dcol)


def _context(obs: pd.DataFrame, mask: np.ndarray, cmap: dict[str, str]) -> dict[str, str]:
    """A donor's context fields: each field's most frequent value among its cells, else 'unknown'."""
    out = {}
    for key in CONTEXT:
        col = cmap.get(key, key)
        vals = obs.loc[mask, col].dropna().astype(str) if col in obs.columns else pd.Series([], dtype=str)
        out[key] = str(vals.mode().iloc[0]) if len(vals) else UNKNOWN
    return out

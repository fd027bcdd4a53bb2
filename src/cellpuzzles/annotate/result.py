"""The result of ``annotate``: the per-group table, ``to_adata`` and ``to_plots``."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cellpuzzles.core import atomic

SCORE_PREFIX = "score: "  # table columns "score: <candidate>" (constrained mode with a local model)
EMBEDDINGS = ("X_umap", "X_tsne", "X_draw_graph_fa", "X_pca")
GENES_PER_GROUP_IN_DOTPLOT = 3


@dataclass
class Annotation:
    """``table``: one row per (donor, group): group, donor, n_cells, assigned_type, status
    ("ok" or why it failed), reasoning, puzzle, shared_with (the other groups of its puzzle),
    top_genes, and one ``score: <candidate>`` column per candidate when the mode gives scores."""

    table: pd.DataFrame
    candidates: list[str]
    params: dict  # the request: groupby, donor_key, model/endpoint, mode, top_k, assignment per donor, ...
    notes: list[str] = field(default_factory=list)
    adata: object = None  # the annotated AnnData (not copied)
    cell_rows: np.ndarray | None = None  # per cell: its row in table (-1: no group)
    var_names: list[list[str]] = field(default_factory=list)  # per row: its top genes as var names

    @property
    def scores(self) -> pd.DataFrame | None:
        cols = [c for c in self.table.columns if c.startswith(SCORE_PREFIX)]
        return self.table[cols].rename(columns=lambda c: c[len(SCORE_PREFIX):]) if cols else None

    def cell_types(self) -> pd.Categorical:
        """Each cell's assigned type (NaN for a cell without a group or in a failed group)."""
        per_row = self.table["assigned_type"].to_numpy(dtype=object)
        vals = np.where(self.cell_rows >= 0, per_row[np.maximum(self.cell_rows, 0)], None)
        used = [c for c in self.candidates if c in set(per_row)]
        return pd.Categorical(vals, categories=used)

    def to_adata(self, key_added: str = "cellpuzzles_type", copy: bool = False):
        """The AnnData with ``obs[key_added]`` (categorical) and ``uns[key_added]``: the table
        (scores as a groups x candidates array beside the candidates), the notes and the
        request parameters."""
        ad = self.adata.copy() if copy else self.adata
        ad.obs[key_added] = pd.Categorical(self.cell_types(), categories=self.cell_types().categories)
        plain = self.table[[c for c in self.table.columns if not c.startswith(SCORE_PREFIX)]].copy()
        text = [c for c in plain.columns if plain[c].dtype == object]
        plain[text] = plain[text].fillna("").astype(str)  # a failed group's type: "" (h5ad strings have no None)
        entry = {"table": plain, "candidates": np.asarray(self.candidates, dtype=object),
                 "params": {k: _plain(v) for k, v in self.params.items() if v is not None},
                 "notes": np.asarray(self.notes, dtype=object)}
        if self.scores is not None:
            entry["scores"] = self.scores.to_numpy(dtype=float)
        ad.uns[key_added] = entry
        return ad

    def to_csv(self, path: str | os.PathLike) -> Path:
        with atomic.atomic_path(path) as tmp:
            self.table.to_csv(tmp, index=False)
        return Path(path)

    def to_plots(self, folder: str | os.PathLike, key_added: str = "cellpuzzles_type") -> list[Path]:
        """PNGs: the embedding coloured by assigned type (when obsm holds one) and a dot plot
        of the groups' top genes by assigned type. Returns the files written."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import scanpy as sc

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        ad = self.to_adata(key_added, copy=True)
        written = []
        basis = next((b for b in EMBEDDINGS if b in ad.obsm), None)
        if basis is not None:
            fig = sc.pl.embedding(ad, basis=basis, color=key_added, show=False, return_fig=True,
                                  title=f"{key_added} ({self.params.get('assignment', '')})")
            written.append(_save(fig, folder / f"{basis.removeprefix('X_')}_{key_added}.png"))
            plt.close(fig)
        ok = self.table["status"] == "ok"
        genes = list(dict.fromkeys(g for r in np.flatnonzero(ok.to_numpy())
                                   for g in self.var_names[r][:GENES_PER_GROUP_IN_DOTPLOT]))
        if genes and ad.obs[key_added].notna().any():
            source = self.params.get("matrix")
            kw = {"layer": "counts", "use_raw": False} if source == "layers/counts" else {"use_raw": source == "raw/X"}
            sub = ad[ad.obs[key_added].notna()].copy()
            sub.obs[key_added] = sub.obs[key_added].cat.remove_unused_categories()
            dp = sc.pl.dotplot(sub, var_names=genes, groupby=key_added, show=False, return_fig=True, **kw)
            dp.make_figure()
            written.append(_save(dp.fig, folder / f"dotplot_{key_added}.png"))
            plt.close(dp.fig)
        return written


def _save(fig, path: Path) -> Path:
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path


def _plain(v):
    """A value anndata can write into uns."""
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items() if x is not None}
    if isinstance(v, (list, tuple)):
        return np.asarray([str(x) for x in v], dtype=object)
    return v if isinstance(v, (int, float, str, bool)) else str(v)

"""The cells table: one row per cell with its donor, type, context and top-K genes.

Built in one streaming pass over the expression matrix (row chunks from a lazily opened
.h5ad); the same pass records per-cell matrix stats for the validation suite. Gene lists
are kept as integer indices into the gene vocabulary in memory, and written to Parquet as
``list<string>``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from cellpuzzles.core import atomic
from cellpuzzles.core.errors import CellPuzzlesError, short_reason
from cellpuzzles.data.h5ad import H5ad
from cellpuzzles.data.topk import TopK

STAT_COLUMNS = ("n_expressed", "min_value", "n_nonfinite")


@dataclass
class CellsOptions:
    """How the cells table is built."""

    top_k: int = 50
    exclude: tuple[str, ...] = ()  # gene-name regexes to drop, e.g. ("^MT-", "^RP[SL]")
    chunk_size: int = 10_000
    column_map: dict[str, str] = field(default_factory=dict)
    progress: bool = True


@dataclass
class Cells:
    obs: pd.DataFrame  # cell_id, donor_id, cell_type, context fields[, batch], stats
    top: np.ndarray  # int32 [cells, k] gene indices, -1 padded
    genes: np.ndarray  # gene vocabulary (symbols)
    meta: dict  # source file, matrix, k, exclusions

    def __len__(self) -> int:
        return len(self.obs)

    def gene_lists(self, rows) -> list[list[str]]:
        return [[str(self.genes[g]) for g in self.top[r] if g >= 0] for r in rows]

    # -- Parquet --
    def to_parquet(self, path: str | os.PathLike) -> Path:
        counts = (self.top >= 0).sum(1)
        offsets = np.zeros(len(self) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        flat = self.top[self.top >= 0]  # row-major: each row's genes in order
        values = pa.array(self.genes.astype(str)).take(pa.array(flat, type=pa.int32()))
        table = pa.Table.from_pandas(self.obs, preserve_index=False)
        table = table.append_column("top_genes", pa.LargeListArray.from_arrays(pa.array(offsets), values))
        table = table.replace_schema_metadata({b"cellpuzzles": json.dumps(self.meta).encode()})
        with atomic.atomic_path(path) as tmp:
            pq.write_table(table, tmp, row_group_size=100_000)
        return Path(path)

    @classmethod
    def from_parquet(cls, path: str | os.PathLike) -> Cells:
        path = Path(path)
        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowInvalid) as e:
            raise CellPuzzlesError(f"{path}: not a readable Parquet cells table ({short_reason(e)}); "
                                   "rebuild it with `cellpuzzles cells`") from None
        if "top_genes" not in table.column_names or "cell_type" not in table.column_names:
            raise CellPuzzlesError(f"{path}: not a cells table (needs cell_type and top_genes); rebuild it with `cellpuzzles cells`")
        meta = json.loads((table.schema.metadata or {}).get(b"cellpuzzles", b"{}"))
        lists = table.column("top_genes").combine_chunks()
        enc = pc.dictionary_encode(lists.flatten())
        k = int(meta.get("top_k") or max(1, int(pc.max(pc.list_value_length(lists)).as_py() or 1)))
        offsets = np.asarray(lists.offsets)
        lengths = np.diff(offsets)
        top = np.full((len(table), k), -1, dtype=np.int32)
        cols = np.arange(len(enc)) - np.repeat(offsets[:-1] - offsets[0], lengths)
        top[np.repeat(np.arange(len(table)), lengths), cols] = np.asarray(enc.indices)
        obs = table.drop(["top_genes"]).to_pandas()
        return cls(obs=obs, top=top, genes=np.asarray(enc.dictionary.to_pylist(), dtype=object), meta=meta)


def build_cells(path: str | os.PathLike, options: CellsOptions | None = None) -> Cells:
    """Read an .h5ad and compute the cells table (nothing written)."""
    opt = options or CellsOptions()
    if opt.top_k < 1:
        raise CellPuzzlesError(f"--top-k {opt.top_k}: must be at least 1")
    with H5ad(path, opt.column_map) as h:
        obs = h.obs()
        n, g = h.matrix.shape
        if n != len(obs):
            raise CellPuzzlesError(f"{h.path.name}: matrix has {n} rows but obs has {len(obs)} cells; the file is inconsistent")
        topk = TopK(h.matrix.genes, opt.top_k, opt.exclude)
        top = np.empty((n, opt.top_k), dtype=np.int32)
        stats = {c: np.empty(n, dtype=float if c == "min_value" else np.int64) for c in STAT_COLUMNS}
        bar = tqdm(total=n, unit="cell", desc="top genes", disable=not opt.progress, leave=False)
        for start, chunk in h.iter_chunks(opt.chunk_size):
            out, st = topk(chunk)
            stop = start + out.shape[0]
            if h.matrix.source == "X" and (st["min_value"] < 0).any():
                raise CellPuzzlesError(
                    f"{h.path.name}: X has negative values (scaled data) and the file has no raw counts "
                    "(layers['counts'] or raw.X); export the .h5ad with its counts"
                )
            top[start:stop] = out
            for c in STAT_COLUMNS:
                stats[c][start:stop] = st[c]
            bar.update(out.shape[0])
        bar.close()
        for c in STAT_COLUMNS:
            obs[c] = stats[c]
        meta = {
            "source": str(h.path),
            "matrix": h.matrix.source,
            "n_genes": int(g),
            "top_k": opt.top_k,
            "exclude": list(opt.exclude),
            "column_map": opt.column_map,
        }
        return Cells(obs=obs, top=top, genes=h.matrix.genes, meta=meta)


def load_cells(path: str | os.PathLike, options: CellsOptions | None = None) -> Cells:
    """Cells from an .h5ad (computed) or a cells Parquet table (read)."""
    p = Path(path)
    if p.suffix == ".parquet":
        return Cells.from_parquet(p)
    return build_cells(p, options)

"""Reading .h5ad files lazily: obs/var in memory, the expression matrix in row chunks.

The default schema is CELLxGENE's. Files that name things differently work through a
column map (canonical name -> the file's obs column), e.g. ``cell_type=bulk_labels``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import read_elem, sparse_dataset

from cellpuzzles.core.errors import CellPuzzlesError, short_reason
from cellpuzzles.core.options import parse_key_value

REQUIRED = ("donor_id", "cell_type")
CONTEXT = ("tissue", "disease", "sex", "development_stage", "self_reported_ethnicity")
OPTIONAL = ("batch",)
CANONICAL = REQUIRED + CONTEXT + OPTIONAL
UNKNOWN = "unknown"


def parse_column_map(items: Sequence[str] | None) -> dict[str, str]:
    """``["cell_type=bulk_labels", ...]`` -> ``{"cell_type": "bulk_labels"}``, checked."""
    out: dict[str, str] = {}
    for item in items or ():
        key, col = parse_key_value(item, "--map", "cell_type=bulk_labels", form="FIELD=COLUMN")
        if not col:
            raise CellPuzzlesError(f"--map {item!r}: expected FIELD=COLUMN, e.g. --map cell_type=bulk_labels")
        if key not in CANONICAL:
            raise CellPuzzlesError(f"--map {item!r}: unknown field '{key}'; mappable fields: {', '.join(CANONICAL)}")
        out[key] = col
    return out


@dataclass
class Matrix:
    """Which matrix was chosen and its gene symbols."""

    source: str  # "layers/counts", "raw/X" or "X"
    genes: np.ndarray
    shape: tuple[int, int]


class H5ad:
    """An open .h5ad file. Use as a context manager."""

    def __init__(self, path: str | os.PathLike, column_map: dict[str, str] | None = None):
        self.path = Path(path)
        self.column_map = dict(column_map or {})
        if not self.path.is_file():
            raise CellPuzzlesError(f"{self.path}: file not found; check the path")
        try:
            self._f = h5py.File(self.path, "r")
        except OSError as e:
            raise CellPuzzlesError(f"{self.path}: not a readable HDF5/.h5ad file ({short_reason(e)}); "
                                   "pass an .h5ad written by anndata") from None
        try:
            self.obs_raw = read_elem(self._f["obs"])
            self.matrix = self._choose_matrix()
        except CellPuzzlesError:
            self.close()
            raise
        except (OSError, KeyError, ValueError, TypeError) as e:
            self.close()
            raise CellPuzzlesError(f"{self.path}: unreadable or truncated .h5ad ({short_reason(e)}); "
                                   "re-export or re-download the file") from None

    # -- context manager --
    def __enter__(self) -> H5ad:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        f = getattr(self, "_f", None)
        if f is not None and f.id.valid:
            f.close()

    # -- metadata --
    @property
    def n_cells(self) -> int:
        return len(self.obs_raw)

    def obs(self) -> pd.DataFrame:
        """Canonical obs: cell_id + required + context (+ batch when present), as strings.

        Missing context columns become 'unknown'; missing required columns are an error.
        Null values are kept as None so validation can report them.
        """
        cols = list(self.obs_raw.columns)
        for key, col in self.column_map.items():
            if col not in cols:
                raise CellPuzzlesError(
                    f"--map {key}={col}: {self.path.name} has no obs column '{col}'; obs columns are: {', '.join(map(str, cols))}"
                )
        out = pd.DataFrame(index=pd.RangeIndex(self.n_cells))
        out["cell_id"] = _as_str(pd.Series(self.obs_raw.index))
        for key in CANONICAL:
            col = self.column_map.get(key, key)
            if col in cols:
                out[key] = _as_str(self.obs_raw[col].reset_index(drop=True))
            elif key in REQUIRED:
                raise CellPuzzlesError(
                    f"{self.path.name}: obs has no '{col}' column (required); name the column holding it with --map {key}=COLUMN "
                    f"(obs columns: {', '.join(map(str, cols))})"
                )
            elif key in CONTEXT:
                out[key] = UNKNOWN
        for key in CONTEXT:
            out[key] = out[key].fillna(UNKNOWN)
        return out

    def _choose_matrix(self) -> Matrix:
        f = self._f
        if "layers" in f and "counts" in f["layers"]:
            return Matrix("layers/counts", self._gene_names("var"), _shape(f["layers/counts"]))
        if "raw" in f and "X" in f["raw"]:
            return Matrix("raw/X", self._gene_names("raw/var"), _shape(f["raw/X"]))
        if "X" in f:
            return Matrix("X", self._gene_names("var"), _shape(f["X"]))
        raise CellPuzzlesError(f"{self.path}: no expression matrix (layers/counts, raw/X or X); pass a complete .h5ad")

    def _gene_names(self, var_key: str) -> np.ndarray:
        var = read_elem(self._f[var_key])
        names = var["feature_name"] if "feature_name" in var.columns else pd.Series(var.index)
        return np.asarray(_as_str(pd.Series(names).reset_index(drop=True)).fillna(""), dtype=object)

    # -- matrix --
    def iter_chunks(self, chunk_size: int = 10_000) -> Iterator[tuple[int, sp.csr_matrix]]:
        """Yield ``(start_row, csr_chunk)`` over the chosen matrix, reading lazily."""
        elem = self._f[self.matrix.source]
        try:
            if isinstance(elem, h5py.Dataset):
                reader = lambda a, b: sp.csr_matrix(elem[a:b])  # noqa: E731
            else:
                enc = elem.attrs.get("encoding-type", "")
                ds = sparse_dataset(elem)
                if enc == "csc_matrix":
                    reader = lambda a, b: sp.csr_matrix(ds[a:b])  # noqa: E731
                else:
                    reader = lambda a, b: ds[a:b]  # noqa: E731
            n = self.matrix.shape[0]
            for start in range(0, n, chunk_size):
                yield start, sp.csr_matrix(reader(start, min(n, start + chunk_size)))
        except (OSError, KeyError, ValueError) as e:
            raise CellPuzzlesError(
                f"{self.path}: matrix {self.matrix.source} is unreadable or truncated ({short_reason(e)}); re-export the file"
            ) from None


def _shape(elem) -> tuple[int, int]:
    if isinstance(elem, h5py.Dataset):
        return tuple(int(x) for x in elem.shape)  # type: ignore[return-value]
    return tuple(int(x) for x in elem.attrs["shape"])  # type: ignore[return-value]


def _as_str(s: pd.Series) -> pd.Series:
    """Strings, with real nulls kept as None (not the text 'nan')."""
    s = s.astype(object)
    return s.where(s.notna(), None).map(lambda v: v if v is None else str(v))

"""The embedded default dataset: scanpy's bundled pbmc68k_reduced (real PBMCs, one healthy
donor, 10 types), rewritten with CELLxGENE-style obs columns. No network is used."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from cellpuzzles.core import atomic

FILE_NAME = "pbmc68k_reduced.h5ad"
DONOR = "pbmc68k-donor-1"


def materialise(data_dir: str | os.PathLike = "data") -> Path:
    """Write ``data_dir/pbmc68k_reduced.h5ad``; byte-identical on every call and machine
    with the same package versions, so ``data.dvc`` matches a fresh materialisation."""
    import anndata as ad
    import scanpy as sc

    src = sc.datasets.pbmc68k_reduced()
    obs = pd.DataFrame(index=src.obs_names.astype(str))
    obs["donor_id"] = pd.Categorical([DONOR] * src.n_obs)
    obs["cell_type"] = pd.Categorical(src.obs["bulk_labels"].astype(str))
    obs["tissue"] = pd.Categorical(["blood"] * src.n_obs)
    obs["disease"] = pd.Categorical(["normal"] * src.n_obs)
    for col in ("sex", "development_stage", "self_reported_ethnicity"):
        obs[col] = pd.Categorical(["unknown"] * src.n_obs)  # not recorded in the source
    obs["assay"] = pd.Categorical(["10x 3' v1"] * src.n_obs)
    var = pd.DataFrame(index=src.var_names.astype(str))
    var["feature_name"] = var.index.astype(str)
    # X stays the source's scaled matrix; raw.X holds log1p(counts per 10k), the matrix we rank
    raw = ad.AnnData(X=src.raw.X.astype("float32"), obs=obs[[]], var=var.copy())
    out = ad.AnnData(X=src.X.astype("float32"), obs=obs, var=var)
    out.raw = raw
    path = Path(data_dir) / FILE_NAME
    with atomic.atomic_path(path) as tmp:
        out.write_h5ad(tmp)
    return path

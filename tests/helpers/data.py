"""Small real AnnData objects with marker structure, for the data tests."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

TYPES = ["B cell", "T cell", "NK cell", "monocyte", "dendritic cell"]


def make_adata(n_per_type: int = 8, donors=("d1", "d2"), n_genes: int = 60, seed: int = 0, types=TYPES) -> ad.AnnData:
    """Counts with marker structure: type t expresses genes [10t, 10t+10) highly."""
    rng = np.random.default_rng(seed)
    rows, obs = [], []
    for d in donors:
        for ti, t in enumerate(types):
            for _k in range(n_per_type):
                lam = np.full(n_genes, 0.3)
                lam[(10 * ti) % n_genes:(10 * ti) % n_genes + 10] = 6.0
                rows.append(rng.poisson(lam))
                obs.append({"donor_id": d, "cell_type": t, "tissue": "blood", "disease": "normal",
                            "sex": "female" if d == "d1" else "male", "development_stage": "40-year-old stage",
                            "self_reported_ethnicity": "unknown"})
    obs = pd.DataFrame(obs, index=[f"c{i}" for i in range(len(obs))])
    var = pd.DataFrame(index=[f"ENSG{i:05d}" for i in range(n_genes)])
    var["feature_name"] = [f"GENE{i:03d}" for i in range(n_genes)]
    return ad.AnnData(X=sp.csr_matrix(np.asarray(rows, dtype=np.float32)), obs=obs, var=var)

"""Shared fixtures: small real .h5ad files written with anndata."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

os.environ.setdefault("DVC_NO_ANALYTICS", "1")

TYPES = ["B cell", "T cell", "NK cell", "monocyte", "dendritic cell"]


def make_adata(n_per_type: int = 8, donors=("d1", "d2"), n_genes: int = 60, seed: int = 0, types=TYPES) -> ad.AnnData:
    """Counts with marker structure: type t expresses genes [10t, 10t+10) highly."""
    rng = np.random.default_rng(seed)
    rows, obs = [], []
    for d in donors:
        for ti, t in enumerate(types):
            for k in range(n_per_type):
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


@pytest.fixture
def h5ad_file(tmp_path) -> Path:
    path = tmp_path / "cells.h5ad"
    make_adata().write_h5ad(path)
    return path


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    """Run the real console entry point in a subprocess."""
    return subprocess.run([sys.executable, "-m", "cellpuzzles.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tests run in 2 xdist workers on 2 cores: torch's intra-op threads would fight each
    other (tiny matmuls slow down ~1000x), so each worker uses one."""
    try:
        import torch
    except ImportError:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server_at(d: Path):
    """A real `mlflow server` on 127.0.0.1 (SQLite backend, proxied artifacts under d/artifacts)."""
    import time
    import urllib.request

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{d}/mlflow.db",
         "--artifacts-destination", str(d / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=open(d / "server.log", "w"), stderr=subprocess.STDOUT,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2):
                break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("mlflow server did not start:\n" + (d / "server.log").read_text()[-2000:])
            time.sleep(0.5)
    try:
        yield {"uri": uri, "artifacts": d / "artifacts"}
    finally:
        proc.terminate()
        proc.wait(timeout=30)

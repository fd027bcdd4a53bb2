"""Shared fixtures. Helpers (stand-ins, server launchers, data builders) live in tests/helpers/.

Layout: tests/unit/ runs in-process in seconds; tests/integration/ starts real servers and
subprocesses, and every test there is marked ``integration`` here. Tests that take more
than ~2 s are marked ``slow`` where they are defined. The quick check is
``python -m pytest -m "not slow and not integration"``.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import pytest

from helpers.data import make_adata
from helpers.mlflow_server import mlflow_server_at

os.environ.setdefault("DVC_NO_ANALYTICS", "1")

INTEGRATION = Path(__file__).resolve().parent / "integration"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if INTEGRATION in item.path.resolve().parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def h5ad_file(tmp_path) -> Path:
    path = tmp_path / "cells.h5ad"
    make_adata().write_h5ad(path)
    return path


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


@contextlib.contextmanager
def _process_state_put_back():
    """os.environ and MLflow's process-wide tracking URI as they were on entry, on exit.
    (mlflow.set_tracking_uri, which the library's connect() calls, sets a module global and
    $MLFLOW_TRACKING_URI; a test or module fixture must not leave either to the tests after it.)"""
    env = dict(os.environ)
    mlflow_utils = sys.modules.get("mlflow.tracking._tracking_service.utils")
    uri = getattr(mlflow_utils, "_tracking_uri", None)
    try:
        yield
    finally:
        mlflow_utils = sys.modules.get("mlflow.tracking._tracking_service.utils")
        if mlflow_utils is not None and getattr(mlflow_utils, "_tracking_uri", None) != uri:
            import mlflow

            mlflow.set_tracking_uri(uri)
        for k in set(os.environ) - set(env):
            del os.environ[k]
        for k, v in env.items():
            if os.environ.get(k) != v:
                os.environ[k] = v


@pytest.fixture(autouse=True, scope="module")
def _module_leaves_no_process_state():
    with _process_state_put_back():
        yield


@pytest.fixture(autouse=True)
def _test_leaves_no_process_state():
    with _process_state_put_back():
        yield


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 for the module (SQLite backend, proxied artifacts
    under ``server["artifacts"]``); $MLFLOW_TRACKING_URI points at it while the module runs."""
    with mlflow_server_at(tmp_path_factory.mktemp("mlflow")) as server, pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", server["uri"])
        yield server

"""A real `mlflow server` subprocess on 127.0.0.1 (used by the ``mlflow_server`` fixture in conftest.py)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from helpers.net import free_port


@contextlib.contextmanager
def mlflow_server_at(d: Path):
    """A real `mlflow server` on 127.0.0.1 (SQLite backend, proxied artifacts under d/artifacts).
    Yields {"uri": "http://127.0.0.1:PORT", "artifacts": d/artifacts}."""
    port = free_port()
    with open(d / "server.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{d}/mlflow.db",
             "--artifacts-destination", str(d / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT,
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
                proc.wait()
                pytest.fail("mlflow server did not start:\n" + (d / "server.log").read_text()[-2000:])
            time.sleep(0.5)
    try:
        yield {"uri": uri, "artifacts": d / "artifacts"}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

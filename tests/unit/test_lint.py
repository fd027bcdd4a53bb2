"""The repository lints clean with ruff (rules and line length from pyproject.toml's [tool.ruff])."""

from __future__ import annotations

import subprocess
import sys

from helpers.paths import ROOT


def test_ruff_check_passes():
    r = subprocess.run([sys.executable, "-m", "ruff", "check", str(ROOT)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, f"ruff check failed (exit {r.returncode}):\n{r.stdout}{r.stderr}"

"""The real console entry point in a subprocess."""

from __future__ import annotations

import subprocess
import sys


def run_cli(*args, cwd=None, env=None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m cellpuzzles.cli ARGS` (each arg str()-ed), output captured as text."""
    return subprocess.run([sys.executable, "-m", "cellpuzzles.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)

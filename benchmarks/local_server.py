"""A `cellpuzzles` server process on 127.0.0.1 for the serving benchmarks (serve_load.py,
serve_fairness.py, serve_vllm.py): started on a free port, ready when its readiness route
answers 200, stopped with SIGTERM."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CellPuzzlesProcess:
    """`cellpuzzles ARGS --port P` until stopped."""

    def __init__(self, args: list[str], log: Path, ready: str = "/v2/health/ready", timeout_s: float = 300,
                 env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "cellpuzzles.cli", *args, "--port", str(self.port)],
                                     stdout=open(log, "w"), stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        deadline = time.time() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(self.url + ready, timeout=2):
                    return
            except (urllib.error.HTTPError, OSError):
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise SystemExit(f"{args[0]} did not start:\n{log.read_text()[-2000:]}") from None
                time.sleep(0.3)

    def stop(self, timeout: float = 60) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=timeout)

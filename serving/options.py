"""The model server's options (light: no KServe import), shared by ``cellpuzzles serve`` and
``python -m cellpuzzles.serving``."""

from __future__ import annotations

from dataclasses import dataclass

from cellpuzzles.core.errors import CellPuzzlesError
from cellpuzzles.core.options import option
from cellpuzzles.serving.protocol import MODES


@dataclass
class ServeOptions:
    model: str = option(help="a model folder, or models:/NAME@ALIAS (downloaded with MLflow from MLFLOW_TRACKING_URI)")
    port: int = option(8080, "HTTP port (binds 0.0.0.0)")
    mode: str = option("constrained", "default decoding mode; a request's 'mode' field overrides it", choices=MODES)
    max_batch_size: int = option(16, "most instances decoded in one batch (1: no batching)")
    max_wait_ms: float = option(10.0, "how long the first instance waits for company")
    max_cells: int = option(30, "most cells per instance (400 above it)")
    max_body_bytes: int = option(1_000_000, "request body limit in bytes (413 above it)")
    workers: int = option(1, "server processes (only 1: scale with replicas)")

    def check(self) -> None:
        if self.mode not in MODES:
            raise CellPuzzlesError(f"--mode {self.mode}: use one of {', '.join(MODES)}")
        if self.workers != 1:
            raise CellPuzzlesError(f"--workers {self.workers}: only 1 is supported (the model and its batcher live in "
                                   "one process); scale with replicas")
        for flag, v in (("--max-batch-size", self.max_batch_size), ("--max-cells", self.max_cells),
                        ("--max-body-bytes", self.max_body_bytes), ("--port", self.port)):
            if v < 1:
                raise CellPuzzlesError(f"{flag} {v}: must be at least 1")
        if self.max_wait_ms < 0:
            raise CellPuzzlesError(f"--max-wait-ms {self.max_wait_ms}: must be 0 or more")

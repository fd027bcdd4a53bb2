"""The model server's options (light: no KServe import), shared by ``cellpuzzles serve`` and
``python -m cellpuzzles.serving``. The limits bound what one request may cost; their
defaults keep the largest allowed request of the default model within a few seconds on 2
CPU cores (measured: benchmarks/serve_fairness.py, docs/serving.md#limits)."""

from __future__ import annotations

from dataclasses import dataclass

from cellpuzzles.core.errors import CellPuzzlesError
from cellpuzzles.core.options import option
from cellpuzzles.serving.protocol import MODES


@dataclass
class ServeOptions:
    model: str = option(help="a model folder, or models:/NAME@ALIAS (downloaded with MLflow from MLFLOW_TRACKING_URI)")
    host: str = option("127.0.0.1", "address to bind (0.0.0.0 in the serving image, to be reachable in a pod)")
    port: int = option(8080, "HTTP port")
    mode: str = option("constrained", "default decoding mode; a request's 'mode' field overrides it", choices=MODES)
    max_batch_size: int = option(16, "most instances decoded in one batch (1: no batching)")
    max_wait_ms: float = option(10.0, "how long the first instance waits for company")
    interleave: bool = option(True, "fill each batch with instances of the waiting requests in turn, so a large "
                                    "request cannot hold back small ones (off: first come, first served)")
    max_instances: int = option(32, "most instances per request (400 above it)")
    max_cells: int = option(30, "most cells per instance (400 above it)")
    max_genes: int = option(1000, "most genes per cell, ranked or in an expression map (400 above it)")
    max_prompt_tokens: int = option(4096, "most tokens in one instance's prompt, counted with the model's tokenizer "
                                          "(400 above it)")
    max_body_bytes: int = option(1_000_000, "request body limit in bytes (413 above it)")
    request_timeout_s: float = option(60.0, "server-side deadline per request: its remaining work is dropped and it "
                                            "gets 504")
    header_timeout_s: float = option(10.0, "seconds a client has to send a request's headers (the connection is "
                                           "closed after that)")
    body_timeout_s: float = option(30.0, "seconds a client has to send a request's body (408 after that)")
    max_header_bytes: int = option(16384, "largest request head (request line and headers) in bytes (400 above it)")
    workers: int = option(1, "server processes (only 1: scale with replicas)")

    def check(self) -> None:
        if self.mode not in MODES:
            raise CellPuzzlesError(f"--mode {self.mode}: use one of {', '.join(MODES)}")
        if self.workers != 1:
            raise CellPuzzlesError(f"--workers {self.workers}: only 1 is supported (the model and its batcher live in "
                                   "one process); scale with replicas")
        for flag, v in (("--max-batch-size", self.max_batch_size), ("--max-cells", self.max_cells),
                        ("--max-instances", self.max_instances), ("--max-genes", self.max_genes),
                        ("--max-prompt-tokens", self.max_prompt_tokens), ("--max-body-bytes", self.max_body_bytes),
                        ("--max-header-bytes", self.max_header_bytes), ("--port", self.port)):
            if v < 1:
                raise CellPuzzlesError(f"{flag} {v}: must be at least 1")
        for flag, v in (("--request-timeout-s", self.request_timeout_s), ("--header-timeout-s", self.header_timeout_s),
                        ("--body-timeout-s", self.body_timeout_s)):
            if not v > 0:
                raise CellPuzzlesError(f"{flag} {v}: must be more than 0 seconds")
        if self.max_wait_ms < 0:
            raise CellPuzzlesError(f"--max-wait-ms {self.max_wait_ms}: must be 0 or more")
        if not self.host.strip():
            raise CellPuzzlesError("--host: empty; give an address such as 127.0.0.1 or 0.0.0.0")

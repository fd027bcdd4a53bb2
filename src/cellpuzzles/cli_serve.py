"""`cellpuzzles serve` (the KServe model server) and `cellpuzzles serve-transformer` (the
transformer in front of an OpenAI-compatible predictor such as vLLM). Heavy imports stay
inside the handlers."""

from __future__ import annotations

import argparse


def cmd_serve(a) -> int:
    from .serving import ServeOptions, serve

    return serve(ServeOptions(model=a.model, port=a.port, mode=a.mode, max_batch_size=a.max_batch_size,
                              max_wait_ms=a.max_wait_ms, max_cells=a.max_cells, max_body_bytes=a.max_body_bytes,
                              workers=a.workers))


def cmd_serve_transformer(a) -> int:
    from .serving_transformer import TransformerOptions, serve_transformer

    return serve_transformer(TransformerOptions(
        predictor_url=a.predictor_url, port=a.port, predictor_model=a.predictor_model, mode=a.mode,
        max_cells=a.max_cells, max_body_bytes=a.max_body_bytes, timeout_s=a.timeout, genes_per_cell=a.genes_per_cell))


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=int, default=8080, help="HTTP port (binds 0.0.0.0; default 8080)")
    p.add_argument("--mode", choices=["constrained", "free"], default="constrained",
                   help="default decoding mode; a request's 'mode' field overrides it")
    p.add_argument("--max-cells", type=int, default=30, help="most cells per instance (400 above it)")
    p.add_argument("--max-body-bytes", type=int, default=1_000_000, help="request body limit in bytes (413 above it)")


def add_commands(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over HTTP (KServe V1/V2 and an OpenAI-compatible chat route)")
    p.add_argument("--model", required=True,
                   help="a model folder, or models:/NAME@ALIAS (downloaded with MLflow from MLFLOW_TRACKING_URI)")
    _common(p)
    p.add_argument("--max-batch-size", type=int, default=16, help="most instances decoded in one batch (1: no batching)")
    p.add_argument("--max-wait-ms", type=float, default=10.0, help="how long the first instance waits for company")
    p.add_argument("--workers", type=int, default=1, help="server processes (only 1: scale with replicas)")
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("serve-transformer",
                       help="KServe transformer: structured puzzles -> an OpenAI-compatible predictor (vLLM) -> answers")
    p.add_argument("--predictor-url", required=True,
                   help="predictor base URL, e.g. http://model-predictor (its /openai/v1/chat/completions is called)")
    p.add_argument("--predictor-model", default="cellpuzzles", help="model name at the predictor (default cellpuzzles)")
    p.add_argument("--genes-per-cell", type=int, default=50,
                   help="genes kept per cell from raw expression and ranked lists (default 50)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the predictor per request")
    _common(p)
    p.set_defaults(fn=cmd_serve_transformer)

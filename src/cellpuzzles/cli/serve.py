"""`cellpuzzles serve` (the KServe model server) and `cellpuzzles serve-transformer` (the
transformer in front of an OpenAI-compatible predictor such as vLLM). Heavy imports stay
inside the handlers."""

from __future__ import annotations

import argparse

from cellpuzzles.core.options import add_arguments, from_args
from cellpuzzles.serving.options import ServeOptions


def cmd_serve(a) -> int:
    from cellpuzzles.serving.server import serve

    return serve(from_args(ServeOptions, a))


def cmd_serve_transformer(a) -> int:
    from cellpuzzles.serving.transformer import TransformerOptions, serve_transformer

    return serve_transformer(TransformerOptions(
        predictor_url=a.predictor_url, port=a.port, predictor_model=a.predictor_model, mode=a.mode,
        max_cells=a.max_cells, max_body_bytes=a.max_body_bytes, timeout_s=a.timeout, model_dir=a.model_dir,
        constrained_by=a.constrained_by))


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=int, default=8080, help="HTTP port (binds 0.0.0.0; default 8080)")
    p.add_argument("--mode", choices=["constrained", "free"], default="constrained",
                   help="default decoding mode; a request's 'mode' field overrides it")
    p.add_argument("--max-cells", type=int, default=30, help="most cells per instance (400 above it)")
    p.add_argument("--max-body-bytes", type=int, default=1_000_000, help="request body limit in bytes (413 above it)")


def add_commands(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over HTTP (KServe V1/V2 and an OpenAI-compatible chat route)")
    add_arguments(p, ServeOptions)
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("serve-transformer",
                       help="KServe transformer: structured puzzles -> an OpenAI-compatible predictor (vLLM) -> answers")
    p.add_argument("--predictor-url", required=True,
                   help="predictor base URL, e.g. http://model-predictor (its /openai/v1/chat/completions is called)")
    p.add_argument("--predictor-model", default="cellpuzzles", help="model name at the predictor (default cellpuzzles)")
    p.add_argument("--model-dir", default="",
                   help="the served model folder or models:/NAME@ALIAS (KServe: /mnt/models): its tokenizer and "
                        "prompt options (cellpuzzles.json)")
    p.add_argument("--constrained-by", choices=["scores", "repair"], default="scores",
                   help="constrained mode: score every candidate per slot from the predictor's prompt logprobs "
                        "(vLLM), or 'repair' the free answer (fallback for predictors without prompt logprobs)")
    p.add_argument("--predictor-timeout", dest="timeout", type=float, default=300.0,
                   help="seconds to wait for the predictor per request")
    _common(p)
    p.set_defaults(fn=cmd_serve_transformer)

"""``python -m cellpuzzles.serving``: the model server's entry point in an image, with KServe's
own arguments (``--http_port``, ``--timeout-keep-alive``, …) plus the model's options."""

from __future__ import annotations

import argparse
import sys

from kserve.model_server import parser as kserve_parser

from cellpuzzles.core.errors import CellPuzzlesError
from cellpuzzles.core.options import add_arguments, from_args
from cellpuzzles.serving.options import ServeOptions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cellpuzzles.serving", parents=[kserve_parser])
    add_arguments(parser, ServeOptions, skip=("port", "workers"))  # KServe's --http_port and --workers
    args = parser.parse_args(argv)
    try:
        from cellpuzzles.serving.server import serve

        return serve(from_args(ServeOptions, args, port=args.http_port, workers=args.workers))
    except CellPuzzlesError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())

"""What every pipeline step shares: progress lines, failure reporting, kfp metrics."""

from __future__ import annotations

from cellpuzzles.core import atomic
from cellpuzzles.core.errors import CellPuzzlesError


def progress(msg: str) -> None:
    """A progress line (``cellpuzzles run`` shows these lines and logs everything else)."""
    import time

    print(f"[cellpuzzles {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_step(name: str, fn, *args, **kwargs):
    """Call a step; on a user-facing error print one line, append ``name: reason`` to the file
    named by CELLPUZZLES_FAILURE_FILE (``cellpuzzles run`` reads it to say which step failed
    and why) and exit with the error's code, so the pipeline task fails."""
    import os
    import sys

    try:
        return fn(*args, **kwargs)
    except CellPuzzlesError as e:
        print(f"error: {name}: {e}", file=sys.stderr, flush=True)
        target = os.environ.get("CELLPUZZLES_FAILURE_FILE")
        if target:
            with open(target, "a") as fh:
                fh.write(f"{name}: {e}\n")
        raise SystemExit(e.exit_code) from None


def log_kfp_metrics(artifact, values: dict) -> None:
    """Log scalars on a kfp ``Metrics`` output and also write them to its file: kfp keeps
    metrics in metadata only, and kfp.local's cache treats an output with no file as
    missing, so a step with metrics would never be reused."""
    for k, v in values.items():
        artifact.log_metric(k, float(v))
    atomic.write_json(artifact.path, {k: float(v) for k, v in values.items()})

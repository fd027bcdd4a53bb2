"""What every pipeline step shares: progress lines, failure reporting, kfp metrics."""

from __future__ import annotations

import json
import logging
import os
import sys

from cellpuzzles.core import atomic
from cellpuzzles.core.errors import CellPuzzlesError

PROGRESS_ENV = "CELLPUZZLES_PROGRESS_FILE"  # set by `cellpuzzles run`: where the steps' progress events go
FAILURE_ENV = "CELLPUZZLES_FAILURE_FILE"  # set by `cellpuzzles run`: "step: reason" of a failed step
log = logging.getLogger("cellpuzzles.progress")
_step = {"name": ""}


class ProgressFile(logging.Handler):
    """Appends each progress record as one JSON line ({time, step, event, message}) to a file
    that the local runner follows; steps run in separate processes, so each line is one append."""

    def __init__(self, path: str):
        super().__init__(logging.INFO)
        self.path = path

    def emit(self, record: logging.LogRecord) -> None:
        line = json.dumps({"time": record.created, "step": getattr(record, "step", ""),
                           "event": getattr(record, "event", "progress"), "message": record.getMessage()})
        with open(self.path, "a") as fh:
            fh.write(line + "\n")


def _handlers() -> None:
    if getattr(log, "_configured", False):
        return
    log.setLevel(logging.INFO)
    log.propagate = False
    stream = logging.StreamHandler(sys.stdout)  # the task's own log
    stream.setFormatter(logging.Formatter("[cellpuzzles %(asctime)s] %(message)s", "%H:%M:%S"))
    log.addHandler(stream)
    if os.environ.get(PROGRESS_ENV):
        log.addHandler(ProgressFile(os.environ[PROGRESS_ENV]))
    log._configured = True


def progress(msg: str, event: str = "progress") -> None:
    """A progress line of the current step, to the task log and (under `cellpuzzles run`) to the progress file."""
    _handlers()
    log.info(msg, extra={"step": _step["name"], "event": event})


def run_step(name: str, fn, *args, **kwargs):
    """Call a step, reporting its start and end as progress events; on a user-facing error print
    one line, append ``name: reason`` to the file named by CELLPUZZLES_FAILURE_FILE (``cellpuzzles
    run`` reads it to say which step failed and why) and exit with the error's code, so the
    pipeline task fails."""
    _step["name"] = name
    progress("started", "start")
    try:
        result = fn(*args, **kwargs)
    except CellPuzzlesError as e:
        print(f"error: {name}: {e}", file=sys.stderr, flush=True)
        progress(str(e), "failed")
        target = os.environ.get(FAILURE_ENV)
        if target:
            with open(target, "a") as fh:
                fh.write(f"{name}: {e}\n")
        raise SystemExit(e.exit_code) from None
    progress("finished", "done")
    return result


def log_kfp_metrics(artifact, values: dict) -> None:
    """Log scalars on a kfp ``Metrics`` output and also write them to its file: kfp keeps
    metrics in metadata only, and kfp.local's cache treats an output with no file as
    missing, so a step with metrics would never be reused."""
    for k, v in values.items():
        artifact.log_metric(k, float(v))
    atomic.write_json(artifact.path, {k: float(v) for k, v in values.items()})

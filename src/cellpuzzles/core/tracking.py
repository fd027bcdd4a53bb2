"""MLflow logging: one parent run per pipeline run, a nested run per step.

The tracking URI is ``MLFLOW_TRACKING_URI`` when set, else a SQLite store under the work
directory. A server that is down is reported in one line before any training starts;
if it fails mid-run, the step's files stay on disk and the error says where.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from cellpuzzles.core.errors import CellPuzzlesError, short_reason

EXPERIMENT = "cellpuzzles"


def tracking_uri(work_dir: str | os.PathLike) -> str:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{(Path(work_dir).resolve() / 'mlflow.db')}"


def connect(work_dir: str | os.PathLike, experiment: str = EXPERIMENT) -> str:
    """Point MLflow at the store for ``work_dir``, check it answers, select the experiment."""
    uri = tracking_uri(work_dir)
    if not uri.startswith(("http://", "https://")):
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    return connect_uri(uri, experiment)


def connect_uri(uri: str, experiment: str = EXPERIMENT) -> str:
    """Point MLflow at ``uri`` (a server, or ``sqlite:///…/mlflow.db`` whose artifacts go to
    ``mlartifacts/`` beside it), check it answers, select the experiment."""
    import logging

    import mlflow

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # no INFO chatter (DB migrations) on stderr
    if uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as r:
                r.read()
        except (urllib.error.URLError, OSError) as e:
            raise CellPuzzlesError(
                f"MLflow tracking server {uri} is unreachable ({getattr(e, 'reason', e)}); start it, fix "
                "MLFLOW_TRACKING_URI, or unset it to log to a local store"
            ) from None
    mlflow.set_tracking_uri(uri)
    if uri.startswith("sqlite:") and not os.environ.get("MLFLOW_ARTIFACT_ROOT"):
        db = Path(uri.removeprefix("sqlite:///"))
        db.parent.mkdir(parents=True, exist_ok=True)
        if mlflow.get_experiment_by_name(experiment) is None:
            mlflow.create_experiment(experiment, artifact_location=(db.parent.resolve() / "mlartifacts").as_uri())
    mlflow.set_experiment(experiment)
    return uri


@contextlib.contextmanager
def step_run(uri: str | None, step: str, params: dict | None = None, tags: dict | None = None) -> Iterator[str | None]:
    """One MLflow run for one pipeline step (tag ``cellpuzzles.step``); yields its run id,
    or None when ``uri`` is empty (tracking off)."""
    if not uri:
        yield None
        return
    import mlflow

    connect_uri(uri)
    with logged(f"the {step} step"), mlflow.start_run(run_name=step, tags={"cellpuzzles.step": step, **(tags or {})}) as r:
        if params:
            mlflow.log_params(flat_params(params))
        yield r.info.run_id


@contextlib.contextmanager
def logged(where: str) -> Iterator[None]:
    """Turn an MLflow or transport failure (tracking, registry) into one CellPuzzlesError line
    naming ``where`` (e.g. "the register step"). Our own errors, and errors that are not
    MLflow's, pass through unchanged."""
    try:
        yield
    except CellPuzzlesError:
        raise
    except Exception as e:  # MLflow raises many types (MlflowException, requests errors, OSError)
        mod = type(e).__module__
        if not (mod.startswith(("mlflow", "requests", "urllib3", "sqlalchemy")) or isinstance(e, ConnectionError)):
            raise  # not an MLflow failure: a real bug or a data/disk error must surface as itself
        raise CellPuzzlesError(f"MLflow failed during {where} ({type(e).__name__}: {short_reason(e)})") from None


@contextlib.contextmanager
def environment_restored() -> Iterator[None]:
    """Leave ``os.environ`` on exit as it was on entry. MLflow exports what it connects to
    (``MLFLOW_TRACKING_URI``, ``MLFLOW_EXPERIMENT_ID``) for subprocesses; a connection made for
    one call (the registry client) must not redirect later ones."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        for key in [k for k in os.environ if k not in saved]:
            del os.environ[key]
        for key, value in saved.items():
            if os.environ.get(key) != value:
                os.environ[key] = value


def flat_params(config: dict, prefix: str = "") -> dict[str, str]:
    """Nested options as MLflow params (dotted keys, values <= 500 chars)."""
    out: dict[str, str] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_params(v, key + "."))
        else:
            out[key] = json.dumps(v, default=str)[:500] if not isinstance(v, str) else v[:500]
    return out


def log_metrics(prefix: str, metrics: dict, step: int | None = None) -> None:
    import mlflow

    flat = {}
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            flat[f"{prefix}{k}"] = float(v)
        elif k.endswith("_ci") and isinstance(v, (list, tuple)) and len(v) == 2:
            flat[f"{prefix}{k}_lo"], flat[f"{prefix}{k}_hi"] = float(v[0]), float(v[1])
    mlflow.log_metrics(flat, step=step)


def log_by_n(name: str, metrics: dict) -> None:
    import mlflow

    rows = [{"n": int(n), **{k: v for k, v in r.items() if not isinstance(v, list)}} for n, r in metrics["by_n"].items()]
    mlflow.log_table(_columns(rows), artifact_file=f"tables/{name}_by_n.json")


def _columns(rows: Sequence[dict]) -> dict[str, list]:
    keys = list(rows[0]) if rows else []
    return {k: [r.get(k) for r in rows] for k in keys}

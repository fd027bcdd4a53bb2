"""The model registry: every trained model becomes a version of a registered MLflow model.

A version carries its model folder (artifact ``model``) and its evaluation folder (artifact
``evaluation``) in one MLflow run, tags with its metrics, test set, data and code versions
and config, and the alias ``challenger``. The gate (gate.py) moves ``champion``/``previous``;
deploy (deploy.py) serves whichever alias or version it is asked for.

The tracking server is ``MLFLOW_TRACKING_URI`` (or ``--tracking-uri``); without one, a
SQLite store in the current folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

from cellpuzzles.core.errors import CellPuzzlesError
from cellpuzzles.core.tracking import logged

DEFAULT_NAME = "cellpuzzles"
CHALLENGER, CHAMPION, PREVIOUS = "challenger", "champion", "previous"
MODEL_ARTIFACT, EVAL_ARTIFACT = "model", "evaluation"
REGISTERED_TAG = "cellpuzzles.registered"  # set last: a version without it was cut short and is completed on retry


def client(tracking_uri: str | None = None, work_dir: str | os.PathLike = "."):
    """An MlflowClient on ``tracking_uri`` (default: the store for ``work_dir``, see
    core.tracking) once it answers (one clear line if the server is down). The process
    environment is left as it was."""
    from mlflow.tracking import MlflowClient

    from cellpuzzles.core.tracking import connect, connect_uri, environment_restored

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # stderr stays one line on errors
    with logged("the connection to MLflow"), environment_restored():
        uri = connect_uri(tracking_uri) if tracking_uri else connect(work_dir)
    return MlflowClient(uri)


def code_version() -> str:
    """cellpuzzles.__version__ plus the git commit when known (CELLPUZZLES_GIT_COMMIT in images)."""
    from cellpuzzles import __version__

    commit = os.environ.get("CELLPUZZLES_GIT_COMMIT", "")
    if not commit:
        try:
            r = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=Path(__file__).parent,
                               capture_output=True, text=True, timeout=5)
            commit = r.stdout.strip() if r.returncode == 0 else ""
        except OSError:
            commit = ""
    return f"{__version__}+g{commit}" if commit else __version__


def metric_tags(record: dict) -> dict[str, str]:
    """``metric.<mode>.<name>`` for every scalar metric (intervals as ``[lo, hi]`` JSON)."""
    tags = {}
    for mode, m in record["modes"].items():
        for k, v in m.get("metrics", {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                tags[f"metric.{mode}.{k}"] = repr(float(v))
            elif isinstance(v, (list, tuple)):
                tags[f"metric.{mode}.{k}"] = json.dumps(v)
    return tags


def _find_version(c, name: str, run_id: str, source: str):
    from mlflow.exceptions import MlflowException

    try:
        found = c.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    except MlflowException:
        return None
    same = [v for v in found if v.source == source]
    return min(same, key=lambda v: int(v.version)) if same else None


def register(model_dir: str | os.PathLike, eval_dir: str | os.PathLike, name: str = DEFAULT_NAME,
             run_id: str | None = None, tags: dict | None = None, *, config: dict | None = None,
             data_version: str | None = None, tracking_uri: str | None = None) -> str:
    """Register a model folder and its evaluation as a new version of ``name``; returns the
    version number. Idempotent: the same run's model is never registered twice."""
    from mlflow.exceptions import MlflowException

    from cellpuzzles.evaluation.record import read_evaluation
    from cellpuzzles.inference.folder import PROMPT_FILE, check_folder

    model_dir, eval_dir = Path(model_dir), Path(eval_dir)
    check_folder(model_dir)
    record = read_evaluation(eval_dir)
    if config is None and (model_dir / PROMPT_FILE).is_file():
        config = {"prompt": json.loads((model_dir / PROMPT_FILE).read_text())}
    c = client(tracking_uri)
    with logged(f"the registration of {model_dir} as '{name}'"):
        if run_id is None:
            from cellpuzzles.core.tracking import EXPERIMENT

            exp = c.get_experiment_by_name(EXPERIMENT)
            run_id = c.create_run(exp.experiment_id, run_name=f"register-{name}").info.run_id
            owned = True
        else:
            owned = False
        source = f"{c.get_run(run_id).info.artifact_uri.rstrip('/')}/{MODEL_ARTIFACT}"
        try:
            c.get_registered_model(name)
        except MlflowException:
            c.create_registered_model(name, description="CellPuzzles models; aliases: challenger, champion, previous")
        all_tags = {**metric_tags(record), "test_sha256": record["test_sha256"],
                    "n_puzzles": str(record.get("n_puzzles", "")), "evaluated_model": str(record.get("model", "")),
                    "code_version": code_version(), "model_dir": str(model_dir)}
        if data_version:
            all_tags["data_version"] = data_version
        if config is not None:
            all_tags["config"] = json.dumps(config, sort_keys=True, default=str)[:5000]
        all_tags.update({str(k): str(v) for k, v in (tags or {}).items()})
        mv = _find_version(c, name, run_id, source)
        if mv is None:
            c.log_artifacts(run_id, str(model_dir), MODEL_ARTIFACT)
            c.log_artifacts(run_id, str(eval_dir), EVAL_ARTIFACT)
            mv = c.create_model_version(name, source=source, run_id=run_id, tags=all_tags)  # one call, not one per tag
        elif mv.tags.get(REGISTERED_TAG) == "true":
            return str(mv.version)  # a retry of a finished registration: nothing moves
        else:  # a registration cut short: complete its tags
            for k, v in all_tags.items():
                if mv.tags.get(k) != v:
                    c.set_model_version_tag(name, str(mv.version), k, v)
        version = str(mv.version)
        c.set_registered_model_alias(name, CHALLENGER, version)
        c.set_model_version_tag(name, version, REGISTERED_TAG, "true")
        if owned:
            c.set_terminated(run_id)
    return version


def resolve_version(c, name: str, version: str | int | None = None, alias: str | None = None):
    """A ModelVersion by number or alias; one clear line when either is unknown."""
    from mlflow.exceptions import MlflowException

    with logged(f"the lookup of model '{name}'"):
        try:
            c.get_registered_model(name)
        except MlflowException:
            raise CellPuzzlesError(f"registered model '{name}' does not exist; register a model first "
                                   f"(`cellpuzzles register`) or pass the right --name") from None
        if version is not None and str(version).isdigit():
            try:
                return c.get_model_version(name, str(version))
            except MlflowException:
                raise CellPuzzlesError(f"model '{name}' has no version {version}; list them in the MLflow UI") from None
        alias = alias or (str(version) if version is not None else CHAMPION)
        try:
            return c.get_model_version_by_alias(name, alias)
        except MlflowException:
            raise CellPuzzlesError(f"model '{name}' has no alias '{alias}'; pass --version N or gate a model first") from None


def alias_version(c, name: str, alias: str) -> str | None:
    """The version an alias points to, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return str(c.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def read_version_evaluation(c, mv) -> dict:
    """The evaluation record stored with a version (its run's ``evaluation/evaluation.json``)."""
    from cellpuzzles.evaluation.record import FILE, read_evaluation

    if not mv.run_id:
        raise CellPuzzlesError(f"model '{mv.name}' version {mv.version} has no run; register it with `cellpuzzles register`")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            with logged(f"the download of the evaluation of version {mv.version}"):
                local = c.download_artifacts(mv.run_id, f"{EVAL_ARTIFACT}/{FILE}", tmp)
        except CellPuzzlesError:
            raise CellPuzzlesError(f"model '{mv.name}' version {mv.version}: its run {mv.run_id} has no "
                                   f"{EVAL_ARTIFACT}/{FILE}; register it with its evaluation folder") from None
        return read_evaluation(Path(local).parent)

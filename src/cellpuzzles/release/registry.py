"""The model registry: every trained model becomes a version of a registered MLflow model.

A version is an MLflow 3 logged model (its model folder as artifact ``model``, the version's
source; a signature and input example; the evaluation metrics linked to it and to the test
set) made from one MLflow run that holds the evaluation folder (artifact ``evaluation``) and
the test set as dataset input; tags with its metrics, test set, data and code versions and
config; a markdown model card as its description (release/model_card.py); and the alias
``challenger``. The experiment is marked for model development so the UI opens on its runs.
The gate (gate.py) moves ``champion``/``previous`` and rewrites the card with its decision;
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
LOGGED_MODEL_TAG = "logged_model_id"  # the version's MLflow 3 logged model (OSS stores do not keep mv.model_id)
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


def _find_version(c, name: str, run_id: str):
    """The version this run already registered under ``name`` (a run registers one model)."""
    from mlflow.exceptions import MlflowException

    try:
        found = c.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    except MlflowException:
        return None
    return min(found, key=lambda v: int(v.version)) if found else None


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
        mv = _find_version(c, name, run_id)
        if mv is None:
            c.log_artifacts(run_id, str(eval_dir), EVAL_ARTIFACT)
            lm = log_model(c, run_id, name, model_dir, record, config)
            mv = c.create_model_version(name, source=f"{lm.artifact_location.rstrip('/')}/{MODEL_ARTIFACT}",
                                        run_id=run_id, tags={**all_tags, LOGGED_MODEL_TAG: lm.model_id},
                                        model_id=lm.model_id)  # one call, not one per tag
        elif mv.tags.get(REGISTERED_TAG) == "true":
            return str(mv.version)  # a retry of a finished registration: nothing moves
        else:  # a registration cut short: complete its tags
            for k, v in all_tags.items():
                if mv.tags.get(k) != v:
                    c.set_model_version_tag(name, str(mv.version), k, v)
        version = str(mv.version)
        c.update_model_version(name, version, description=card(name, version, record, all_tags, config, c, run_id))
        c.set_registered_model_alias(name, CHALLENGER, version)
        c.set_model_version_tag(name, version, REGISTERED_TAG, "true")
        if owned:
            c.set_terminated(run_id)
    return version


EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")  # the UI opens on runs, not GenAI traces


def runs_link(c, run_id: str) -> str | None:
    """The experiment's runs in the MLflow UI of an HTTP tracking server (the UI's workflow switch
    opens GenAI pages unless the link asks for model training)."""
    uri = str(c.tracking_uri)
    if not uri.startswith(("http://", "https://")):
        return None
    return f"{uri.rstrip('/')}/#/experiments/{c.get_run(run_id).info.experiment_id}?workflowType=machine_learning"


def card(name: str, version: str, record: dict, tags: dict, config: dict | None, c=None, run_id: str = "") -> str:
    from cellpuzzles.release.model_card import model_card

    k = ((config or {}).get("prompt") or {}).get("genes_per_cell")
    return model_card(name, version, record, tags, genes_shown=k if isinstance(k, int) else None,
                      runs_url=runs_link(c, run_id) if c is not None and run_id else None)


def evaluation_dataset(record: dict):
    """The evaluation's test puzzles as an MLflow dataset (one row per puzzle: its N, cells and
    types), its digest the test set's identity."""
    import mlflow.data
    import pandas as pd

    ids = sorted(next(iter(record["modes"].values()), {}).get("rewards", {}))
    cells, types = record.get("cells") or {}, record.get("types") or {}
    df = pd.DataFrame({"puzzle_id": ids, "n": [len(types.get(i, [])) or None for i in ids],
                       "cells": [" | ".join(cells.get(i, [])) for i in ids],
                       "types": [" | ".join(types.get(i, [])) for i in ids]})
    return mlflow.data.from_pandas(df, name="test", digest=str(record["test_sha256"])[:16])


def log_model(c, run_id: str, name: str, model_dir: Path, record: dict, config: dict | None):
    """MLflow 3's logged model for this registration, from the run: the model folder (artifact
    ``model``, the version's source: a plain Hugging Face folder KServe and vLLM load), an MLmodel
    with the served request's signature and input example, the prompt options as params, and the
    evaluation metrics linked to the model and to the test set (also the run's dataset input)."""
    from mlflow.entities import DatasetInput, InputTag, LoggedModelInput, Metric
    from mlflow.models import Model, infer_signature

    from cellpuzzles.core.tracking import flat_params
    from cellpuzzles.release.model_card import INPUT_EXAMPLE, OUTPUT_EXAMPLE

    run = c.get_run(run_id)
    c.set_experiment_tag(run.info.experiment_id, *EXPERIMENT_KIND)
    lm = c.create_logged_model(run.info.experiment_id, name=name, source_run_id=run_id, model_type="cellpuzzles",
                               params=flat_params(config or {}), tags={"test_sha256": str(record["test_sha256"])})
    with tempfile.TemporaryDirectory() as tmp:
        m = Model(run_id=run_id, model_id=lm.model_id, artifact_path=MODEL_ARTIFACT,
                  signature=infer_signature([INPUT_EXAMPLE], [OUTPUT_EXAMPLE]))
        m.save(Path(tmp) / "MLmodel")
        (Path(tmp) / "input_example.json").write_text(json.dumps({"instances": [INPUT_EXAMPLE]}, indent=1))
        c.log_model_artifacts(lm.model_id, tmp)
        c.log_model_artifacts(lm.model_id, str(model_dir), MODEL_ARTIFACT)
        # the version's page reads the signature from its source folder: MLmodel beside the weights too
        c.log_model_artifacts(lm.model_id, tmp, MODEL_ARTIFACT)
    ds = evaluation_dataset(record)
    c.log_inputs(run_id, datasets=[DatasetInput(ds._to_mlflow_entity(), [InputTag("mlflow.data.context", "test")])],
                 models=[LoggedModelInput(lm.model_id)])
    import time

    now, metrics = int(time.time() * 1000), []
    for mode, r in sorted(record["modes"].items(), key=lambda kv: kv[0] != "constrained"):  # the served mode first
        for k, v in r.get("metrics", {}).items():
            vals = {k: v} if isinstance(v, (int, float)) and not isinstance(v, bool) else \
                {f"{k}_lo": v[0], f"{k}_hi": v[1]} if isinstance(v, list) and len(v) == 2 else {}
            metrics += [Metric(f"{mode}/{key}", float(val), now, 0, model_id=lm.model_id, dataset_name=ds.name,
                               dataset_digest=ds.digest, run_id=run_id) for key, val in vals.items()]
    c.log_batch(run_id, metrics=metrics)
    return c.finalize_logged_model(lm.model_id, "READY")


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
    from cellpuzzles.evaluation.record import BASELINES_FILE, FILE, read_evaluation

    if not mv.run_id:
        raise CellPuzzlesError(f"model '{mv.name}' version {mv.version} has no run; register it with `cellpuzzles register`")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            with logged(f"the download of the evaluation of version {mv.version}"):
                local = c.download_artifacts(mv.run_id, f"{EVAL_ARTIFACT}/{FILE}", tmp)
        except CellPuzzlesError:
            raise CellPuzzlesError(f"model '{mv.name}' version {mv.version}: its run {mv.run_id} has no "
                                   f"{EVAL_ARTIFACT}/{FILE}; register it with its evaluation folder") from None
        if any(a.path.endswith(BASELINES_FILE) for a in c.list_artifacts(mv.run_id, EVAL_ARTIFACT)):
            c.download_artifacts(mv.run_id, f"{EVAL_ARTIFACT}/{BASELINES_FILE}", tmp)
        return read_evaluation(Path(local).parent)

"""validate and puzzles: the data steps (CPU image)."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Output

from cellpuzzles.release.placement import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE)
def validate(data_source: str, data_version: str, repo_dir: str, column_map: str, top_k: int, mlflow_uri: str,
             cells: Output[Dataset], validation: Output[Artifact], metrics: Output[Metrics]
             ) -> NamedTuple("ValidateOutputs", [("data_version", str), ("mlflow_run_id", str)]):
    """Fetch the data version (dvc), build the cells table, run the Great Expectations suite."""
    from collections import namedtuple

    from cellpuzzles.steps.common import log_kfp_metrics, run_step
    from cellpuzzles.steps.data import DataOptions, data_step

    opt = DataOptions(source=data_source, version=data_version, repo_dir=repo_dir, column_map=column_map, top_k=top_k)
    r = run_step("validate", data_step, opt, cells.path, validation.path, mlflow_uri)
    log_kfp_metrics(metrics, {"cells": r["cells"]})
    cells.metadata["data_version"] = r["data_version"]
    return namedtuple("ValidateOutputs", ["data_version", "mlflow_run_id"])(r["data_version"], r["mlflow_run_id"])


@dsl.component(base_image=CPU_IMAGE)
def puzzles(cells: Input[Dataset], n_min: int, n_max: int, train_per_n: int, test_per_n: int, split_by: str,
            reasoning_fraction: float, seed: int, mlflow_uri: str, puzzle_set: Output[Dataset],
            metrics: Output[Metrics]) -> str:
    """Sample train/reasoning/test CellPuzzles without leakage; score the baseline solvers."""
    from cellpuzzles.data.sample import PuzzleOptions
    from cellpuzzles.steps.common import log_kfp_metrics, run_step
    from cellpuzzles.steps.data import puzzles_step

    opt = PuzzleOptions(n_min=n_min, n_max=n_max, train_per_n=train_per_n, test_per_n=test_per_n,
                        split_by=split_by, reasoning_fraction=reasoning_fraction, seed=seed)
    r = run_step("puzzles", puzzles_step, cells.path, puzzle_set.path, opt, mlflow_uri)
    values = {f"{name}_batch_accuracy": acc for name, acc in r["baselines"].items()}
    values.update({f"{split}_puzzles": r[split] for split in ("train", "reasoning", "test") if split in r})
    log_kfp_metrics(metrics, values)
    return r["mlflow_run_id"]

"""The data steps: validate (cells table + Great Expectations) and puzzles (splits + baselines:
random, markers, the classical peer alone and one-to-one, and the input ceiling)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from cellpuzzles.core import atomic
from cellpuzzles.core.errors import ValidationFailed
from cellpuzzles.core.tracking import log_by_n, log_metrics, step_run
from cellpuzzles.steps.common import progress


@dataclass
class DataOptions:
    source: str = "bundled"  # "bundled" (scanpy's PBMCs, materialised into data/) or an .h5ad path
    version: str = ""  # a git revision of repo_dir whose data.dvc to fetch with DVC ("": the workspace)
    repo_dir: str = "."  # the repository holding data.dvc
    column_map: str = ""  # "field=column,field=column"
    top_k: int = 50


def data_step(opt: DataOptions, cells_dir: str | Path, report_dir: str | Path, mlflow_uri: str = "") -> dict:
    """Fetch the data version, build the cells table, run the validation suite; the cells
    table (``cells_dir/cells.parquet``) is written only when validation passes."""
    import mlflow

    from cellpuzzles.data.cells import CellsOptions, build_cells
    from cellpuzzles.data.h5ad import parse_column_map
    from cellpuzzles.data.validate import validate_cells
    from cellpuzzles.data.versioning import resolve_data
    from cellpuzzles.evaluation.peers import EXPRESSION_FILE, write_expression

    data_file, lineage = resolve_data(opt.source, opt.version, opt.repo_dir)
    tags = {"data.md5": lineage["md5"], "data.dvc_md5": str(lineage.get("dvc_md5")), "data.version": opt.version}
    with step_run(mlflow_uri, "validate", asdict(opt), tags) as run_id:
        progress(f"validate: top {opt.top_k} genes per cell from {data_file}")
        cmap = parse_column_map([x for x in opt.column_map.split(",") if x.strip()])
        cells = build_cells(data_file, CellsOptions(top_k=opt.top_k, column_map=cmap, progress=False))
        report = validate_cells(cells, report_dir)
        print(report.table())
        if run_id:
            mlflow.log_dict(lineage, "lineage.json")
            mlflow.log_metrics({"cells": len(cells.obs), "failed_expectations": len(report.failed)})
            mlflow.log_artifacts(str(report_dir), "validation")
        if not report.success:
            raise ValidationFailed(f"{data_file}: {len(report.failed)} expectation(s) failed: " + "; ".join(report.failed))
        Path(cells_dir).mkdir(parents=True, exist_ok=True)
        # the classical peer's input: log-normalised expression of the same cells
        write_expression(data_file, list(cells.obs["cell_id"]), Path(cells_dir) / EXPRESSION_FILE, cmap)
        cells.to_parquet(Path(cells_dir) / "cells.parquet")  # last: its presence marks the folder complete
    return {"mlflow_run_id": run_id or "", "data_version": str(lineage.get("dvc_md5") or lineage["md5"]),
            "cells": len(cells.obs), "lineage": lineage}


def puzzles_step(cells_dir: str | Path, out_dir: str | Path, opt, mlflow_uri: str = "") -> dict:
    """Sample train/reasoning/test puzzles without leakage and score the baseline solvers."""
    from cellpuzzles.data.cells import load_cells
    from cellpuzzles.data.sample import make_splits, write_splits
    from cellpuzzles.evaluation.evaluate import evaluate_solver, load_split_dir
    from cellpuzzles.evaluation.peers import EXPRESSION_FILE, evaluate_peers, read_expression
    from cellpuzzles.steps.learning import SFTStepOptions

    out = Path(out_dir)
    with step_run(mlflow_uri, "puzzles", asdict(opt)) as run_id:
        progress("puzzles: sampling train/reasoning/test splits")
        cells = load_cells(Path(cells_dir) / "cells.parquet")
        splits, summary = make_splits(cells, opt)
        write_splits(out, splits, summary)
        train, test = load_split_dir(out)
        progress(f"baselines: random and marker-gene solvers on {len(test)} test puzzles")
        base = {name: evaluate_solver(name, train, test, out_dir=out, seed=opt.seed) for name in ("random", "markers")}
        # the genes a tiny model is shown, and every gene a puzzle lists
        ks = sorted({k for k in (SFTStepOptions().genes_per_cell, max(len(g) for p in test for g in p.genes)) if k})
        progress(f"baselines: logistic regression (alone, one-to-one) and the input ceiling (top {ks} genes)")
        expr_file = Path(cells_dir) / EXPRESSION_FILE
        base.update(evaluate_peers(train, test, read_expression(expr_file) if expr_file.is_file() else None, ks,
                                   out_dir=out, seed=opt.seed))
        atomic.write_json(out / "baselines.json", base)
        if run_id:
            import mlflow

            files = json.loads((out / "summary.json").read_text())["files"]
            mlflow.set_tags({f"puzzles.{k}.sha256": v["sha256"] for k, v in files.items()})
            log_splits(out, splits, files)
            for name, r in base.items():
                log_metrics(f"{name}/", r)
                log_by_n(name, r)
                mlflow.log_artifact(str(out / f"predictions_{name}.jsonl"), "baselines")
    return {"mlflow_run_id": run_id or "", "baselines": {k: v["batch_accuracy"] for k, v in base.items()},
            **{k: v["puzzles"] for k, v in summary["splits"].items()}}


def log_splits(out: Path, splits: dict, files: dict) -> None:
    """Each puzzle split as an MLflow dataset input of the active run (one row per puzzle: id, N,
    donor, cells, answer; digest from the split file's sha256), and the experiment marked for
    model development (runs, not GenAI traces)."""
    import mlflow
    import pandas as pd

    from cellpuzzles.release.registry import EXPERIMENT_KIND

    for name, ps in splits.items():
        df = pd.DataFrame({"puzzle_id": [p.puzzle_id for p in ps], "n": [p.n for p in ps],
                           "donor_id": [p.donor_id for p in ps], "cells": [" | ".join(p.cell_ids) for p in ps],
                           "answer": [p.answer_text for p in ps]})
        ds = mlflow.data.from_pandas(df, source=str(out / f"{name}.jsonl"), name=name, digest=files[name]["sha256"][:16])
        mlflow.log_input(ds, context=name)
    mlflow.set_experiment_tag(*EXPERIMENT_KIND)

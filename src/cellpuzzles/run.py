"""The main job: prepare -> validate -> cells -> puzzles -> baselines -> distill -> SFT ->
RL (GRPO, PPO) -> evaluate (free and constrained decoding), all logged to MLflow.

Each step is a library call that reads and writes files under ``out``; ``summary.json``
is written last and names every output.
"""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import __version__, atomic
from .data.bundled import FILE_NAME, materialise
from .data.cells import CellsOptions, build_cells
from .data.h5ad import parse_column_map
from .data.sample import PuzzleOptions, make_splits, write_splits
from .data.validate import validate_cells
from .errors import CellPuzzlesError, ValidationFailed
from .evaluate import evaluate_solver, load_split_dir
from .reward import format_table
from .train.rl_common import RLOptions
from .train.sft import SFTOptions


@dataclass
class LearnOptions:
    """The learning half of the job. ``model``: 'tiny' or a Hugging Face model folder."""

    enabled: bool = True
    model: str = "tiny"
    genes_per_cell: int | None = 6  # genes per cell shown to the tiny model (short prompts, most of the signal)
    rl_algos: tuple[str, ...] = ("grpo", "ppo")
    eval_limit: int | None = None  # decode only the first K test puzzles (None: all)
    sft: SFTOptions = field(default_factory=lambda: SFTOptions(max_steps=900, learning_rate=5e-3))
    rl: RLOptions = field(default_factory=lambda: RLOptions(max_steps=15, learning_rate=2e-5))


@dataclass
class RunOptions:
    data: str | None = None  # None: the bundled default under data/
    out: str = "runs/default"
    column_map: list[str] = field(default_factory=list)
    seed: int = 0
    cells: CellsOptions = field(default_factory=CellsOptions)
    puzzles: PuzzleOptions = field(default_factory=lambda: PuzzleOptions(train_per_n=1000, reasoning_fraction=0.5))
    learn: LearnOptions = field(default_factory=LearnOptions)


def data_lineage(data_file: Path) -> dict:
    """The data version: the md5 recorded in data.dvc (when the file sits under a DVC-tracked
    folder) and the md5 of the file itself."""
    lineage = {"file": str(data_file), "md5": _md5(data_file)}
    for parent in [data_file.parent, *data_file.parents]:
        dvc_file = parent.parent / f"{parent.name}.dvc"
        if dvc_file.is_file():
            import yaml

            outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or [{}]
            lineage.update(dvc_file=str(dvc_file), dvc_md5=outs[0].get("md5"))
            break
    return lineage


def _md5(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "md5").hexdigest()


def _step(name: str):
    print(f"[{time.strftime('%H:%M:%S')}] {name}", flush=True)


def _prepare_data(opt: RunOptions, out: Path) -> tuple[Path, dict, object]:
    _step("prepare")
    if opt.data is None:
        data_file = Path("data") / FILE_NAME
        if not data_file.is_file():
            from .data.versioning import sync_cache

            materialise("data")
            sync_cache(".", "data")
    else:
        data_file = Path(opt.data)
    _step(f"cells: top {opt.cells.top_k} genes per cell from {data_file}")
    cells = build_cells(data_file, opt.cells)
    _step("validate")
    report = validate_cells(cells, out / "validation")
    print(report.table())
    if not report.success:
        raise ValidationFailed(f"{data_file}: {len(report.failed)} expectation(s) failed: " + "; ".join(report.failed))
    cells.to_parquet(out / "cells.parquet")
    _step("puzzles")
    splits, psummary = make_splits(cells, opt.puzzles)
    write_splits(out / "puzzles", splits, psummary)
    return data_file, psummary, report


def run(opt: RunOptions) -> dict:
    out = Path(opt.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").unlink(missing_ok=True)  # the completion marker is written last
    t0 = time.time()
    opt.cells.column_map = parse_column_map(opt.column_map)
    opt.cells.progress = sys.stderr.isatty()
    opt.puzzles.seed = opt.seed
    data_file, psummary, report = _prepare_data(opt, out)  # bad data fails here, before MLflow is touched
    mlflow_uri = None
    if opt.learn.enabled:
        from .tracking import connect

        mlflow_uri = connect(out)  # a configured server that is down fails here, before any training
    lineage = {**data_lineage(data_file), "puzzle_files": {k: v["sha256"] for k, v in
                                                            _read_json(out / "puzzles" / "summary.json")["files"].items()}}

    models: dict[str, dict] = {}
    folders: dict[str, str] = {}
    run_id = None
    if opt.learn.enabled:
        from .learn import learn

        models, folders, run_id = learn(opt, out, lineage)
    else:
        _step("baselines: random and marker-gene solvers on the test split")
        train, test = load_split_dir(out / "puzzles")
        models = {name: {"free": evaluate_solver(name, train, test, out / "eval", seed=opt.seed)} for name in ("random", "markers")}

    print("\n" + format_table({f"{m}/{mode}": r for m, modes in models.items() for mode, r in modes.items()}))
    summary = {
        "version": __version__,
        "options": asdict(opt),
        "data": lineage,
        "validation": {"success": report.success, "summary": str(out / "validation" / "validation.json"),
                       "data_docs": str(report.docs_index)},
        "cells": str(out / "cells.parquet"),
        "puzzles": {"dir": str(out / "puzzles"), **{k: v["puzzles"] for k, v in psummary["splits"].items()}},
        "models": {name: {mode: {k: v for k, v in m.items() if k != "by_n"} for mode, m in modes.items()}
                   for name, modes in models.items()},
        "model_folders": folders,
        "mlflow": {"tracking_uri": mlflow_uri, "parent_run_id": run_id} if mlflow_uri else None,
        "wall_seconds": round(time.time() - t0, 1),
    }
    atomic.write_json(out / "summary.json", summary)
    ui = f"mlflow ui --backend-store-uri {mlflow_uri}" if mlflow_uri else "(MLflow off)"
    print(f"\ndone in {summary['wall_seconds']}s. outputs in {out}/:\n"
          f"  summary.json                      all metrics and model folders\n"
          f"  validation/data_docs/index.html   data validation report\n"
          f"  puzzles/                          train/reasoning/test CellPuzzles JSONL\n"
          f"  models/                           trained model folders (Hugging Face format)\n"
          f"  eval/                             predictions and metrics per model and decoding mode\n"
          f"  MLflow: {ui}")
    return summary


def _read_json(path: Path) -> dict:
    import json

    return json.loads(path.read_text())


__all__ = ["RunOptions", "LearnOptions", "run", "CellPuzzlesError"]

"""The main job: prepare -> validate -> cells -> puzzles -> baseline evaluation.

Each step is a library call that reads and writes files under ``out``; ``summary.json``
is written last and names every output. Later stages (distill, SFT, RL, gate, deploy)
extend this same job.
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


@dataclass
class RunOptions:
    data: str | None = None  # None: the bundled default under data/
    out: str = "runs/default"
    column_map: list[str] = field(default_factory=list)
    seed: int = 0
    cells: CellsOptions = field(default_factory=CellsOptions)
    puzzles: PuzzleOptions = field(default_factory=PuzzleOptions)


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
    h = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _step(name: str):
    print(f"[{time.strftime('%H:%M:%S')}] {name}", flush=True)


def run(opt: RunOptions) -> dict:
    out = Path(opt.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").unlink(missing_ok=True)  # the completion marker is written last
    t0 = time.time()
    opt.cells.column_map = parse_column_map(opt.column_map)
    opt.cells.progress = sys.stderr.isatty()
    opt.puzzles.seed = opt.seed

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

    _step("baselines: random and marker-gene solvers on the test split")
    train, test = load_split_dir(out / "puzzles")
    models = {name: {"free": evaluate_solver(name, train, test, out / "eval", seed=opt.seed)} for name in ("random", "markers")}
    print(format_table({k: v["free"] for k, v in models.items()}))

    summary = {
        "version": __version__,
        "options": asdict(opt),
        "data": data_lineage(data_file),
        "validation": {"success": report.success, "summary": str(out / "validation" / "validation.json"),
                       "data_docs": str(report.docs_index)},
        "cells": str(out / "cells.parquet"),
        "puzzles": {"dir": str(out / "puzzles"), **{k: v["puzzles"] for k, v in psummary["splits"].items()}},
        "models": {name: {mode: {k: v for k, v in m.items() if k != "by_n"} for mode, m in modes.items()}
                   for name, modes in models.items()},
        "wall_seconds": round(time.time() - t0, 1),
    }
    atomic.write_json(out / "summary.json", summary)
    print(f"\ndone in {summary['wall_seconds']}s. outputs in {out}/:\n"
          f"  summary.json               all metrics and paths\n"
          f"  validation/data_docs/index.html   data validation report\n"
          f"  cells.parquet              the cells table\n"
          f"  puzzles/                   train/test CellPuzzles JSONL\n"
          f"  eval/                      predictions and metrics per baseline")
    return summary


__all__ = ["RunOptions", "run", "CellPuzzlesError"]

"""The pipeline's steps as library functions: files in, files out, one MLflow run each.

A Kubeflow component (components/), a test, or a script calls these; none of them knows
where it runs. Every step returns a small dict (its MLflow run id and headline figures)
and writes its outputs atomically, so a step killed mid-way leaves nothing that looks
complete."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from . import atomic
from .errors import CellPuzzlesError, ValidationFailed
from .tracking import log_by_n, log_metrics, step_run

VAL_SIZE = 32  # RL validation puzzles, held out from RL updates


def progress(msg: str) -> None:
    """A progress line (``cellpuzzles run`` shows these lines and logs everything else)."""
    import time

    print(f"[cellpuzzles {time.strftime('%H:%M:%S')}] {msg}", flush=True)


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

    from .data.cells import CellsOptions, build_cells
    from .data.h5ad import parse_column_map
    from .data.validate import validate_cells
    from .data.versioning import resolve_data

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
        cells.to_parquet(Path(cells_dir) / "cells.parquet")
    return {"mlflow_run_id": run_id or "", "data_version": str(lineage.get("dvc_md5") or lineage["md5"]),
            "cells": len(cells.obs), "lineage": lineage}


def puzzles_step(cells_dir: str | Path, out_dir: str | Path, opt, mlflow_uri: str = "") -> dict:
    """Sample train/reasoning/test puzzles without leakage and score the baseline solvers."""
    from .data.cells import load_cells
    from .data.sample import make_splits, write_splits
    from .evaluate import evaluate_solver, load_split_dir

    out = Path(out_dir)
    with step_run(mlflow_uri, "puzzles", asdict(opt)) as run_id:
        progress("puzzles: sampling train/reasoning/test splits")
        splits, summary = make_splits(load_cells(Path(cells_dir) / "cells.parquet"), opt)
        write_splits(out, splits, summary)
        train, test = load_split_dir(out)
        progress(f"baselines: random and marker-gene solvers on {len(test)} test puzzles")
        base = {name: evaluate_solver(name, train, test, seed=opt.seed) for name in ("random", "markers")}
        atomic.write_json(out / "baselines.json", base)
        if run_id:
            import mlflow

            files = json.loads((out / "summary.json").read_text())["files"]
            mlflow.set_tags({f"puzzles.{k}.sha256": v["sha256"] for k, v in files.items()})
            for name, r in base.items():
                log_metrics(f"{name}/", r)
                log_by_n(name, r)
    return {"mlflow_run_id": run_id or "", "baselines": {k: v["batch_accuracy"] for k, v in base.items()},
            **{k: v["puzzles"] for k, v in summary["splits"].items()}}


@dataclass
class DistillStepOptions:
    teacher: str = "markers"  # "markers" or "openai" (any OpenAI-compatible endpoint)
    base_url: str = ""
    teacher_model: str = ""
    api_key_env: str = "OPENAI_API_KEY"
    attempts: int = 1
    threshold: float = 1.0
    visible_genes: int | None = 6  # markers teacher: cite only the genes the student is shown
    cache_dir: str = ""  # OpenAI teacher's resumable answer cache ("": beside the output)


def distill_step(puzzles_dir: str | Path, out_dir: str | Path, opt: DistillStepOptions, mlflow_uri: str = "") -> dict:
    import mlflow

    from .distill import DistillOptions, distill
    from .puzzle import read_puzzles

    pz, out = Path(puzzles_dir), Path(out_dir)
    train = read_puzzles(pz / "train.jsonl")
    reasoning = read_puzzles(pz / "reasoning.jsonl") if (pz / "reasoning.jsonl").is_file() else train
    if opt.teacher == "markers":
        from .teachers.markers import MarkersTeacher

        teacher = MarkersTeacher(reasoning + train, visible_genes=opt.visible_genes)
    elif opt.teacher == "openai":
        from .teachers.openai_teacher import OpenAITeacher, OpenAITeacherConfig

        if not opt.base_url or not opt.teacher_model:
            raise CellPuzzlesError("teacher openai needs teacher_base_url and teacher_model")
        teacher = OpenAITeacher(OpenAITeacherConfig(base_url=opt.base_url, model=opt.teacher_model,
                                                    api_key_env=opt.api_key_env,
                                                    cache_dir=Path(opt.cache_dir or out.parent / "teacher_cache")))
    else:
        raise CellPuzzlesError(f"teacher {opt.teacher!r}: choose markers or openai")
    with step_run(mlflow_uri, "distill", asdict(opt)) as run_id:
        progress(f"distill: {opt.teacher} teacher on {len(reasoning)} reasoning puzzles")
        stats = distill(reasoning, teacher, DistillOptions(opt.attempts, opt.threshold), out / "traces.jsonl")
        if run_id:
            log_metrics("", {k: v for k, v in stats.items() if isinstance(v, (int, float))})
            mlflow.log_param("teacher.name", stats["teacher"])
    return {"mlflow_run_id": run_id or "", "accepted": stats["accepted"], "acceptance_rate": stats["acceptance_rate"]}


@dataclass
class SFTStepOptions:
    model: str = "tiny"  # "tiny" (built from the traces) or a Hugging Face model folder
    genes_per_cell: int | None = 6  # genes per cell shown to the tiny model
    seed: int = 0
    sft: object = field(default_factory=lambda: _default_sft())


def _default_sft():
    from .train.sft import SFTOptions

    return SFTOptions(max_steps=900, learning_rate=5e-3, batch_size=16)


def sft_step(traces_file: str | Path, out_dir: str | Path, opt: SFTStepOptions, mlflow_uri: str = "") -> dict:
    import mlflow

    from .distill import read_traces
    from .plots import curves
    from .train.callbacks import MetricsLogger
    from .train.model import PromptOptions, TinyConfig, build_tiny
    from .train.sft import sft

    out = Path(out_dir)
    pairs = read_traces(traces_file)
    with step_run(mlflow_uri, "sft", {"model": opt.model, "genes_per_cell": opt.genes_per_cell, **asdict(opt.sft)}) as run_id:
        if opt.model == "tiny":
            progress("sft: build the tiny model and its tokenizer")
            init = build_tiny([p for p, _ in pairs], [t for _, t in pairs], out.parent / (out.name + ".init"),
                              TinyConfig(seed=opt.seed), PromptOptions(genes_per_cell=opt.genes_per_cell))
        else:
            init = Path(opt.model)
        progress(f"sft: {opt.sft.max_steps} steps on {len(pairs)} traces")
        log = MetricsLogger("sft") if run_id else None
        path = sft(pairs, init, out, replace(opt.sft, seed=opt.seed), callbacks=[log] if log else [])
        if run_id and curves(log.history, ["loss", "eval_loss", "mean_token_accuracy"], out.parent / "sft_curves.png", "SFT"):
            mlflow.log_artifact(str(out.parent / "sft_curves.png"), "plots")
    return {"mlflow_run_id": run_id or "", "model": str(path)}


def rl_step(puzzles_dir: str | Path, model_dir: str | Path, out_dir: str | Path, opt, mlflow_uri: str = "") -> dict:
    """RL (``opt.algo``: grpo or ppo) on the train split with the batch-level reward."""
    import mlflow

    from .plots import curves
    from .puzzle import read_puzzles
    from .train.callbacks import MetricsLogger
    from .train.rl import train_rl

    out = Path(out_dir)
    rl_all = read_puzzles(Path(puzzles_dir) / "train.jsonl")
    val, rl_set = rl_all[-VAL_SIZE:], rl_all[:-VAL_SIZE]
    with step_run(mlflow_uri, f"rl-{opt.algo}", asdict(opt)) as run_id:
        progress(f"rl: {opt.algo}, {opt.max_steps} steps from the SFT model")
        log = MetricsLogger(f"rl_{opt.algo}")
        path = train_rl(rl_set, val, model_dir, out, opt, log)
        keys = ["reward", "kl", "rewards/format_ok/mean", "completions/mean_length", "val_batch_accuracy",
                "objective/scores", "objective/kl", "format_ratio"]
        png = out.parent / f"rl_{opt.algo}_curves.png"
        if run_id and curves(log.history, keys, png, f"RL ({opt.algo})"):
            mlflow.log_artifact(str(png), "plots")
    return {"mlflow_run_id": run_id or "", "model": str(path)}


def evaluate_step(model_dir: str | Path, puzzles_dir: str | Path, out_dir: str | Path, name: str = "model",
                  limit: int = 0, seed: int = 0, mlflow_uri: str = "") -> dict:
    """Free and constrained decoding on the test split → the evaluation record (evaluation_record.py)."""
    import shutil

    import mlflow

    from .evaluate import evaluate_model, read_predictions
    from .evaluation_record import write_evaluation
    from .puzzle import read_puzzles
    from .reward import format_table

    pz, out = Path(puzzles_dir), Path(out_dir)
    test = read_puzzles(pz / "test.jsonl")[: limit or None]
    with step_run(mlflow_uri, "evaluate", {"model": name, "limit": limit, "test_puzzles": len(test)}) as run_id:
        progress(f"evaluate {name}: free and constrained decoding on {len(test)} test puzzles")
        work = out.parent / (out.name + ".work")
        shutil.rmtree(work, ignore_errors=True)  # left by a killed attempt
        res = evaluate_model(model_dir, test, work, name=name, seed=seed)
        comps = {m: [read_predictions(work / f"predictions_{name}_{m}.jsonl")[p.puzzle_id] for p in test] for m in res}
        from .plots import accuracy_by_n, confusion

        curves_by_n = {f"{name}/{m}": r for m, r in res.items()}
        if (pz / "baselines.json").is_file():
            shutil.copy(pz / "baselines.json", work / "baselines.json")
            curves_by_n.update(json.loads((pz / "baselines.json").read_text()))
        accuracy_by_n(curves_by_n, work / "accuracy_by_n.png")
        if "constrained" in comps:
            confusion(test, comps["constrained"], work / "confusion.png")
        write_evaluation(work, name, test, comps, res)
        for f in work.glob(f"*_{name}_*"):
            f.unlink()  # the record's own predictions_<mode>.jsonl replace these
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)  # the complete record appears at once
        print(format_table({f"{name}/{m}": r for m, r in res.items()}))
        if run_id:
            for mode, r in res.items():
                log_metrics(f"{mode}/", r)
                log_by_n(f"{name}_{mode}", r)
            mlflow.log_artifacts(str(out), "evaluation")
            for png in ("accuracy_by_n.png", "confusion.png"):
                if (out / png).is_file():
                    mlflow.log_artifact(str(out / png), "plots")
    return {"mlflow_run_id": run_id or "",
            "metrics": {m: {k: r[k] for k in ("batch_accuracy", "cell_accuracy", "format_ratio")} for m, r in res.items()}}


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

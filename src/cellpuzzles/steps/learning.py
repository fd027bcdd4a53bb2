"""The learning steps as library functions (distill, sft, rl, evaluate): files in, files out,
one MLflow run each.

A Kubeflow component (components/), a test, or a script calls these; none of them knows
where it runs. Every step returns a small dict (its MLflow run id and headline figures)
and writes its outputs atomically, so a step killed mid-way leaves nothing that looks
complete."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from cellpuzzles.core import atomic
from cellpuzzles.core.errors import CellPuzzlesError
from cellpuzzles.core.options import option
from cellpuzzles.core.tracking import log_by_n, log_metrics, step_run
from cellpuzzles.steps.common import progress
from cellpuzzles.train.sft import SFTOptions


@dataclass
class DistillStepOptions:
    teacher: str = "markers"  # "markers" or "openai" (any OpenAI-compatible endpoint)
    base_url: str = ""
    teacher_model: str = ""
    api_key_env: str = "OPENAI_API_KEY"
    attempts: int = 1
    threshold: float = 1.0
    student: str = "tiny"  # the model that learns from the traces: "tiny" or a Hugging Face model folder
    visible_genes: int | None = None  # markers teacher: cite only these top genes (default: what the student is shown)
    cache_dir: str = ""  # OpenAI teacher's resumable answer cache ("": beside the output)


def distill_step(puzzles_dir: str | Path, out_dir: str | Path, opt: DistillStepOptions, mlflow_uri: str = "") -> dict:
    import mlflow

    from cellpuzzles.distill.traces import DistillOptions, distill
    from cellpuzzles.task.puzzle import read_puzzles

    pz, out = Path(puzzles_dir), Path(out_dir)
    train = read_puzzles(pz / "train.jsonl")
    reasoning = read_puzzles(pz / "reasoning.jsonl") if (pz / "reasoning.jsonl").is_file() else train
    if opt.teacher == "markers":
        from cellpuzzles.distill.teachers.markers import MarkersTeacher

        visible = opt.visible_genes if opt.visible_genes is not None else student_genes(opt.student)
        teacher = MarkersTeacher(reasoning + train, visible_genes=visible)
    elif opt.teacher == "openai":
        from cellpuzzles.distill.teachers.openai_teacher import OpenAITeacher, OpenAITeacherConfig

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


def student_genes(model: str) -> int | None:
    """Genes per cell the student is shown: the tiny model's setting, or a folder's own prompt
    options (a pretrained model with none sees every gene of the puzzle)."""
    from cellpuzzles.inference.folder import load_prompt_options

    return SFTStepOptions().genes_per_cell if model == "tiny" else load_prompt_options(model).genes_per_cell


@dataclass
class SFTStepOptions:
    model: str = "tiny"  # "tiny" (built from the traces) or a Hugging Face model folder
    genes_per_cell: int | None = option(6, "genes per cell shown to a tiny model")
    seed: int = 0
    sft: SFTOptions = field(default_factory=SFTOptions)


def sft_step(traces_file: str | Path, out_dir: str | Path, opt: SFTStepOptions, mlflow_uri: str = "",
             start_dir: str | Path | None = None) -> dict:
    """SFT on the distilled traces. The tiny model is built (untrained) in ``start_dir``
    (default: beside ``out_dir``), where the pipeline evaluates the untrained start."""
    import mlflow

    from cellpuzzles.distill.traces import read_traces
    from cellpuzzles.evaluation.plots import curves
    from cellpuzzles.inference.folder import PromptOptions
    from cellpuzzles.train.callbacks import MetricsLogger
    from cellpuzzles.train.sft import sft
    from cellpuzzles.train.tiny import TinyConfig, build_tiny

    out = Path(out_dir)
    pairs = read_traces(traces_file)
    with step_run(mlflow_uri, "sft", {"model": opt.model, "genes_per_cell": opt.genes_per_cell, **asdict(opt.sft)}) as run_id:
        if opt.model == "tiny":
            progress("sft: build the tiny model and its tokenizer")
            init = build_tiny([p for p, _ in pairs], [t for _, t in pairs], start_dir or out.parent / (out.name + ".init"),
                              TinyConfig(seed=opt.seed), PromptOptions(genes_per_cell=opt.genes_per_cell))
        else:
            init = Path(opt.model)
            if start_dir:  # the start is the base folder itself: name it, do not copy its weights
                atomic.write_json(Path(start_dir) / START_POINTER, {"model": str(init.resolve())})
        progress(f"sft: {opt.sft.max_steps or 'default'} steps on {len(pairs)} traces")
        log = MetricsLogger("sft") if run_id else None
        path = sft(pairs, init, out, replace(opt.sft, seed=opt.seed), callbacks=[log] if log else [])
        if run_id and curves(log.history, ["loss", "eval_loss", "mean_token_accuracy"], out.parent / "sft_curves.png", "SFT"):
            mlflow.log_artifact(str(out.parent / "sft_curves.png"), "plots")
    return {"mlflow_run_id": run_id or "", "model": str(path)}


START_POINTER = "start.json"


def start_model(start_dir: str | Path) -> str:
    """The model folder of an SFT step's untrained start: the folder itself (the tiny model built
    there) or the pretrained base folder it names."""
    pointer = Path(start_dir) / START_POINTER
    return json.loads(pointer.read_text())["model"] if pointer.is_file() else str(start_dir)


def rl_step(puzzles_dir: str | Path, model_dir: str | Path, out_dir: str | Path, opt, mlflow_uri: str = "") -> dict:
    """RL (``opt.algo``: grpo or ppo) on the train split with the batch-level reward."""
    import mlflow

    from cellpuzzles.evaluation.plots import curves
    from cellpuzzles.task.puzzle import read_puzzles
    from cellpuzzles.train.callbacks import MetricsLogger
    from cellpuzzles.train.rl import train_rl

    out = Path(out_dir)
    rl_all = read_puzzles(Path(puzzles_dir) / "train.jsonl")
    k = min(opt.val_size, len(rl_all) // 4)  # validation held out from RL updates (a quarter at most)
    val, rl_set = rl_all[len(rl_all) - k:], rl_all[:len(rl_all) - k]
    if not rl_set:
        raise CellPuzzlesError(f"rl: no training puzzles in {puzzles_dir}; raise train_per_n")
    with step_run(mlflow_uri, f"rl-{opt.algo}", asdict(opt)) as run_id:
        progress(f"rl: {opt.algo}, {opt.max_steps or 'default'} steps from the SFT model")
        log = MetricsLogger(f"rl_{opt.algo}")
        path = train_rl(rl_set, val, model_dir, out, opt, log)
        keys = ["reward", "kl", "rewards/format_ok/mean", "completions/mean_length", "val_batch_accuracy",
                "objective/scores", "objective/kl", "format_ratio"]
        png = out.parent / f"rl_{opt.algo}_curves.png"
        if run_id and curves(log.history, keys, png, f"RL ({opt.algo})"):
            mlflow.log_artifact(str(png), "plots")
    return {"mlflow_run_id": run_id or "", "model": str(path)}


def evaluate_step(model_dir: str | Path, puzzles_dir: str | Path, out_dir: str | Path, name: str = "model",
                  limit: int | None = None, seed: int = 0, mlflow_uri: str = "",
                  modes: tuple[str, ...] = ("free", "constrained")) -> dict:
    """Decoding (free and constrained by default) on the test split → the evaluation record (evaluation_record.py)."""
    import shutil

    import mlflow

    from cellpuzzles.evaluation.evaluate import evaluate_model, read_predictions
    from cellpuzzles.evaluation.record import write_evaluation
    from cellpuzzles.evaluation.subset import stratified
    from cellpuzzles.task.puzzle import read_puzzles
    from cellpuzzles.task.reward import format_table

    pz, out = Path(puzzles_dir), Path(out_dir)
    test = stratified(read_puzzles(pz / "test.jsonl"), limit)  # every N, when limited
    with step_run(mlflow_uri, "evaluate", {"model": name, "limit": limit, "test_puzzles": len(test)}) as run_id:
        progress(f"evaluate {name}: {' and '.join(modes)} decoding on {len(test)} test puzzles")
        work = out.parent / (out.name + ".work")
        shutil.rmtree(work, ignore_errors=True)  # left by a killed attempt
        res = evaluate_model(model_dir, test, work, modes=modes, name=name, seed=seed)
        comps = {m: [read_predictions(work / f"predictions_{name}_{m}.jsonl")[p.puzzle_id] for p in test] for m in res}
        from cellpuzzles.evaluation.plots import accuracy_by_n, confusion

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
            import sys

            from cellpuzzles.core.tracking import logged
            from cellpuzzles.evaluation.genai import log_puzzle_rows, row_limit
            from cellpuzzles.inference.folder import load_prompt_options

            try:  # each test puzzle a row (prompt, completion, reward) in the run's Traces tab (evaluation/genai.py)
                with logged("the per-puzzle GenAI rows"):
                    row_mode = "constrained" if "constrained" in comps else next(iter(comps), "constrained")
                    rows = log_puzzle_rows(name, test, comps, load_prompt_options(model_dir), row_mode, row_limit())
                progress(f"evaluate {name}: {rows['rows']} of {len(test)} test puzzles ({row_mode}) as rows in the "
                         "MLflow run's Traces tab")
            except CellPuzzlesError as e:  # the metrics, tables and record above are logged: say what is missing
                print(f"warning: evaluate {name}: per-puzzle rows not logged to MLflow ({e}); the metrics and the "
                      "evaluation record are logged", file=sys.stderr, flush=True)
    return {"mlflow_run_id": run_id or "",
            "metrics": {m: {k: r[k] for k in ("batch_accuracy", "cell_accuracy", "format_ratio")} for m, r in res.items()}}

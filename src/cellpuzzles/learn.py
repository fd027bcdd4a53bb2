"""The learning half of the main job: baselines, distillation, SFT, RL, evaluation, each a
nested MLflow run under one parent run."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

from .distill import DistillOptions, distill, read_traces
from .evaluate import evaluate_model, evaluate_solver
from .puzzle import read_puzzles
from .reward import format_table
from .tracking import flat_params, log_by_n, log_metrics, logged

VAL_SIZE = 32


def _step(name: str) -> None:
    import time

    print(f"[{time.strftime('%H:%M:%S')}] {name}", flush=True)


def _log_eval(name: str, results: dict[str, dict], out: Path) -> None:
    import mlflow

    for mode, r in results.items():
        log_metrics(f"{mode}/", r)
        log_by_n(f"{name}_{mode}", r)
        preds = out / "eval" / f"predictions_{name}_{mode}.jsonl"
        if preds.is_file():
            sample = preds.read_text().splitlines()[:20]
            mlflow.log_text("\n".join(sample) + "\n", f"samples/{name}_{mode}.jsonl")


def learn(opt, out: Path, lineage: dict) -> tuple[dict[str, dict], dict[str, str], str]:
    """Returns (metrics per model and decoding mode, model folders, MLflow parent run id)."""
    import mlflow

    from .plots import accuracy_by_n, confusion, curves
    from .teachers.markers import MarkersTeacher
    from .train.callbacks import MetricsLogger
    from .train.model import PromptOptions, TinyConfig, build_tiny
    from .train.rl import train_rl
    from .train.sft import sft

    L = opt.learn
    pz = out / "puzzles"
    rl_all = read_puzzles(pz / "train.jsonl")
    reasoning = read_puzzles(pz / "reasoning.jsonl") if (pz / "reasoning.jsonl").is_file() else rl_all
    test = read_puzzles(pz / "test.jsonl")[: L.eval_limit]
    val, rl_set = rl_all[-VAL_SIZE:], rl_all[:-VAL_SIZE]  # RL validation: held out from RL updates
    models: dict[str, dict] = {}
    folders: dict[str, str] = {}
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)

    with logged("the run", keep=out), mlflow.start_run(run_name="retrain") as parent:
        mlflow.log_params(flat_params(asdict(opt)))
        mlflow.set_tags({"data.md5": lineage.get("md5"), "data.dvc_md5": str(lineage.get("dvc_md5")),
                         **{f"puzzles.{k}.sha256": v for k, v in lineage.get("puzzle_files", {}).items()}})
        mlflow.log_dict(lineage, "lineage.json")

        _step("baselines: random and marker-gene solvers")
        with mlflow.start_run(run_name="baselines", nested=True):
            for name in ("random", "markers"):
                r = evaluate_solver(name, reasoning + rl_all, test, out / "eval", seed=opt.seed)
                models[name] = {"free": r}
                log_metrics(f"{name}/", r)
                log_by_n(name, r)

        # the teacher decides with every gene, but cites only evidence the student is shown
        visible = L.genes_per_cell if L.model == "tiny" else None
        _step(f"distill: markers teacher on {len(reasoning)} reasoning puzzles")
        with mlflow.start_run(run_name="distill", nested=True):
            teacher = MarkersTeacher(reasoning + rl_all, visible_genes=visible)
            stats = distill(reasoning, teacher, DistillOptions(), out / "distill" / "traces.jsonl")
            mlflow.log_params({"teacher": stats["teacher"], "attempts": 1})
            log_metrics("", {k: v for k, v in stats.items() if isinstance(v, (int, float))})
        pairs = read_traces(out / "distill" / "traces.jsonl")

        def evaluate(name: str, path: Path) -> None:
            _step(f"evaluate {name}: free and constrained decoding on {len(test)} test puzzles")
            res = evaluate_model(path, test, out / "eval", name=name, seed=opt.seed)
            models[name] = res
            _log_eval(name, res, out)
            print(format_table({f"{name}/{m}": r for m, r in res.items()}))

        if L.model == "tiny":
            init = out / "models" / "tiny-init"
            _step("build the tiny model and its tokenizer")
            build_tiny([p for p, _ in pairs], [t for _, t in pairs], init, TinyConfig(seed=opt.seed),
                       PromptOptions(genes_per_cell=L.genes_per_cell))
            with mlflow.start_run(run_name="untrained", nested=True):
                evaluate("untrained", init)
        else:
            init = Path(L.model)

        _step(f"sft: {L.sft.max_steps} steps on {len(pairs)} traces")
        with mlflow.start_run(run_name="sft", nested=True):
            mlflow.log_params(flat_params(asdict(L.sft)))
            log = MetricsLogger("sft")
            path = sft(pairs, init, out / "models" / "sft", replace(L.sft, seed=opt.seed), callbacks=[log])
            folders["sft"] = str(path)
            curves(log.history, ["loss", "eval_loss", "mean_token_accuracy"], plots / "sft_curves.png", "SFT")
            mlflow.log_artifact(str(plots / "sft_curves.png"), "plots")
            evaluate("sft", path)
            mlflow.log_artifacts(str(path), "model")

        last = path
        for algo in L.rl_algos:
            _step(f"rl: {algo}, {L.rl.max_steps} steps from the SFT model")
            with mlflow.start_run(run_name=f"rl-{algo}", nested=True):
                ropt = replace(L.rl, algo=algo, seed=opt.seed)
                mlflow.log_params(flat_params(asdict(ropt)))
                log = MetricsLogger(f"rl_{algo}")
                rpath = train_rl(rl_set, val, path, out / "models" / f"rl-{algo}", ropt, log)
                folders[f"rl-{algo}"] = str(rpath)
                keys = ["reward", "kl", "rewards/format_ok/mean", "completions/mean_length", "val_batch_accuracy",
                        "objective/scores", "objective/kl", "format_ratio"]
                if curves(log.history, keys, plots / f"rl_{algo}_curves.png", f"RL ({algo})"):
                    mlflow.log_artifact(str(plots / f"rl_{algo}_curves.png"), "plots")
                evaluate(f"rl-{algo}", rpath)
                mlflow.log_artifacts(str(rpath), "model")
                last = rpath

        learned = {f"{m}/{mode}": r for m, modes in models.items() for mode, r in modes.items()}
        accuracy_by_n(learned, plots / "accuracy_by_n.png")
        final = next(iter(folders[k] for k in reversed(list(folders))))
        final_name = Path(final).name
        preds = out / "eval" / f"predictions_{final_name}_constrained.jsonl"
        if preds.is_file():
            comps = [json.loads(x)["completion"] for x in preds.read_text().splitlines()]
            confusion(test, comps, plots / "confusion.png")
        mlflow.log_artifacts(str(plots), "plots")
        for name, modes in models.items():
            for mode, r in modes.items():
                log_metrics(f"{name}/{mode}/", {k: r[k] for k in ("batch_accuracy", "cell_accuracy", "format_ratio", "uniqueness")})
        mlflow.set_tag("final_model", str(last))
        run_id = parent.info.run_id
    return models, folders, run_id

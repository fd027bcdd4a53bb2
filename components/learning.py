"""distill, sft, rl, evaluate: the learning steps (training image; GPU placement is set in the pipeline)."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from cellpuzzles.release.placement import TRAIN_IMAGE


@dsl.component(base_image=TRAIN_IMAGE)
def distill(puzzle_set: Input[Dataset], teacher: str, teacher_base_url: str, teacher_model: str, attempts: int,
            student: str, mlflow_uri: str, traces: Output[Dataset], metrics: Output[Metrics]) -> str:
    """Reasoning traces from a teacher (markers, or any OpenAI-compatible endpoint), kept when right."""
    from cellpuzzles.steps.common import log_kfp_metrics, run_step
    from cellpuzzles.steps.learning import DistillStepOptions, distill_step

    opt = DistillStepOptions(teacher=teacher, base_url=teacher_base_url, teacher_model=teacher_model, attempts=attempts,
                             student=student)
    r = run_step("distill", distill_step, puzzle_set.path, traces.path, opt, mlflow_uri)
    log_kfp_metrics(metrics, {"accepted": r["accepted"], "acceptance_rate": r["acceptance_rate"]})
    return r["mlflow_run_id"]


@dsl.component(base_image=TRAIN_IMAGE)
def sft(traces: Input[Dataset], base_model: str, options: dict, seed: int, mlflow_uri: str, model: Output[Model],
        start: Output[Model]) -> str:
    """Supervised fine-tuning (TRL SFTTrainer) on the distilled traces; 'tiny' builds the default model
    (its untrained start goes to ``start``; for a pretrained base, ``start`` names the base folder)."""
    import os

    from cellpuzzles.core.options import build
    from cellpuzzles.steps.common import run_step
    from cellpuzzles.steps.learning import SFTStepOptions, sft_step
    from cellpuzzles.train.sft import SFTOptions

    opt = SFTStepOptions(model=base_model, seed=seed, sft=build(SFTOptions, options))
    r = run_step("sft", sft_step, os.path.join(traces.path, "traces.jsonl"), model.path, opt, mlflow_uri, start.path)
    return r["mlflow_run_id"]


@dsl.component(base_image=TRAIN_IMAGE)
def rl(puzzle_set: Input[Dataset], sft_model: Input[Model], algo: str, options: dict, seed: int, mlflow_uri: str,
       model: Output[Model]) -> str:
    """RL with the batch-level reward: GRPO (TRL GRPOTrainer) or PPO (TRL experimental PPOTrainer).
    ``options``: RLOptions fields to set (e.g. {"max_steps": 2}); the rest take the algorithm's defaults."""
    from cellpuzzles.core.options import build
    from cellpuzzles.steps.common import run_step
    from cellpuzzles.steps.learning import rl_step
    from cellpuzzles.train.rl_common import RLOptions

    r = run_step("rl", lambda: rl_step(puzzle_set.path, sft_model.path, model.path,
                                       build(RLOptions, options, algo=algo, seed=seed), mlflow_uri))
    return r["mlflow_run_id"]


@dsl.component(base_image=TRAIN_IMAGE)
def evaluate(model: Input[Model], puzzle_set: Input[Dataset], name: str, options: dict, seed: int, mlflow_uri: str,
             evaluation: Output[Artifact], metrics: Output[Metrics]) -> str:
    """Free and constrained decoding on the held-out test split → the evaluation record.
    ``options``: {"limit": K} decodes only K test puzzles (default: all)."""
    from cellpuzzles.steps.common import log_kfp_metrics, run_step
    from cellpuzzles.steps.learning import evaluate_step

    r = run_step("evaluate", evaluate_step, model.path, puzzle_set.path, evaluation.path, name,
                 int(options["limit"]) if options.get("limit") is not None else None, seed, mlflow_uri)
    log_kfp_metrics(metrics, {f"{mode}_{k}": v for mode, m in r["metrics"].items() for k, v in m.items()})
    return r["mlflow_run_id"]


@dsl.component(base_image=TRAIN_IMAGE)
def evaluate_start(start: Input[Model], puzzle_set: Input[Dataset], options: dict, seed: int, mlflow_uri: str,
                   evaluation: Output[Artifact]) -> str:
    """The untrained start (the tiny model's random init, or the pretrained base) on the same test
    puzzles, constrained decoding only (cheap): what SFT and RL added. ``options`` as for evaluate."""
    from cellpuzzles.steps.common import run_step
    from cellpuzzles.steps.learning import evaluate_step, start_model

    r = run_step("evaluate", evaluate_step, start_model(start.path), puzzle_set.path, evaluation.path, "start",
                 int(options["limit"]) if options.get("limit") is not None else None, seed, mlflow_uri, ("constrained",))
    return r["mlflow_run_id"]

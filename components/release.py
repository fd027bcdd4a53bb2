"""register, gate, deploy and the exit handler: the release steps (CPU image, never cached)."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Markdown, Model, Output

from cellpuzzles.release.placement import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE)
def register(model: Input[Model], evaluation: Input[Artifact], sft_evaluation: Input[Artifact], model_name: str, job_name: str,
             mlflow_uri: str, data_version: str, validate_run: str, puzzles_run: str, distill_run: str, sft_run: str, rl_run: str,
             evaluate_run: str, base_model: str, rl_algo: str, seed: int) -> str:
    """A new version of the registered model with alias 'challenger', tagged with metrics, lineage and
    the paired RL-vs-SFT difference on the same test puzzles."""
    from cellpuzzles.steps.common import run_step
    from cellpuzzles.steps.release import register_step

    runs = {"validate": validate_run, "puzzles": puzzles_run, "distill": distill_run, "sft": sft_run,
            "rl": rl_run, "evaluate": evaluate_run}
    config = {"base_model": base_model, "rl_algo": rl_algo, "seed": seed}
    return run_step("register", register_step, model.path, evaluation.path, model_name, job_name, mlflow_uri,
                    runs, config, data_version, sft_evaluation.path)


@dsl.component(base_image=CPU_IMAGE)
def gate(model_name: str, version: str, min_batch_accuracy: float, min_format_ratio: float, tolerance: float,
         options: dict, mlflow_uri: str, report: Output[Markdown], decision: Output[Artifact]) -> str:
    """'pass' moves the champion alias to this version (the old one becomes 'previous'); 'fail' moves nothing.
    ``options``: other GateOptions fields to set, e.g. {"margin": 0.02}."""
    from cellpuzzles.core.options import build
    from cellpuzzles.release.gate import GateOptions
    from cellpuzzles.steps.common import run_step
    from cellpuzzles.steps.release import gate_step

    opt = dict(min_batch_accuracy=min_batch_accuracy, min_format_ratio=min_format_ratio, tolerance=tolerance)
    return run_step("gate", lambda: gate_step(model_name, version, build(GateOptions, options, **opt), report.path,
                                              decision.path, mlflow_uri))


@dsl.component(base_image=CPU_IMAGE)
def deploy(model_name: str, version: str, namespace: str, storage_uri: str, artifact_store: str, apply: bool, gpus: int,
           min_replicas: int, max_replicas: int, canary_percent: int, mlflow_uri: str, puzzle_set: Input[Dataset],
           verify: bool, verify_url: str, verify_sample: int, verify_tolerance: float, min_batch_accuracy: float,
           manifest: Output[Artifact]) -> str:
    """Render the champion's InferenceService; apply it (and wait, rolling back on failure) when asked.
    With ``verify``, the new service (``verify_url``, else the applied InferenceService's own URL) is
    evaluated on ``verify_sample`` test puzzles of ``puzzle_set`` before it is trusted, and rolled back
    to 'previous' when below the gate's floor or answering differently from the registered evaluation."""
    import os

    from cellpuzzles.release.verify import VerifyOptions
    from cellpuzzles.steps.common import run_step
    from cellpuzzles.steps.release import deploy_step

    check = VerifyOptions(url=verify_url or None, puzzles=os.path.join(puzzle_set.path, "test.jsonl"),
                          sample=verify_sample, tolerance=verify_tolerance,
                          min_batch_accuracy=min_batch_accuracy) if verify else None
    return run_step("deploy", deploy_step, model_name, version, namespace, storage_uri, artifact_store, apply, gpus,
                    min_replicas, max_replicas, canary_percent, manifest.path, mlflow_uri, check)


@dsl.component(base_image=CPU_IMAGE)
def record_status(status: dsl.PipelineTaskFinalStatus, job_name: str, mlflow_uri: str):
    """Exit handler: the pipeline's final state (and the failure) on its MLflow run."""
    from cellpuzzles.steps.release import record_status as record

    record(mlflow_uri, job_name, status.state, status.error_message or "")

"""The retraining pipeline: validate → puzzles → distill → sft → rl → evaluate (the untrained
start, the SFT and the RL model on the same test puzzles) → register → gate → deploy (only when
the gate passes), with an exit handler that records the outcome in MLflow.

GPU placement is declared here, at the call site, by one helper (``on_gpu``); images and the
node pool live in src/cellpuzzles/release/placement.py. Caching is off for evaluate, register, gate and
deploy: a cached evaluation must never promote a model. ``compile_pipeline`` writes the
committed ``retrain.yaml``; ``cellpuzzles run`` executes this same definition with kfp.local.
"""


from pathlib import Path

from kfp import compiler, dsl, kubernetes

from cellpuzzles.components.data import puzzles, validate
from cellpuzzles.components.learning import distill, evaluate, evaluate_start, rl, sft
from cellpuzzles.components.release import deploy, gate, record_status, register
from cellpuzzles.core.options import defaults
from cellpuzzles.data.options import PuzzleOptions
from cellpuzzles.release.gate import GateOptions
from cellpuzzles.release.placement import (
    GPU_ACCELERATOR,
    GPU_NODE_SELECTOR,
    GPU_TOLERATION,
    MLFLOW_SECRET,
    TEACHER_SECRET,
)
from cellpuzzles.release.registry import DEFAULT_NAME
from cellpuzzles.release.verify import VerifyOptions
from cellpuzzles.steps.data import DataOptions
from cellpuzzles.steps.learning import DistillStepOptions, SFTStepOptions
from cellpuzzles.train.rl_common import RLOptions

PIPELINE_YAML = Path(__file__).with_name("retrain.yaml")
# parameter defaults come from the options dataclasses (one definition each; tests/ compare them)
DATA, PUZZLES, DISTILL = defaults(DataOptions), defaults(PuzzleOptions), defaults(DistillStepOptions)
SFT_STEP, RL, GATE = defaults(SFTStepOptions), defaults(RLOptions), defaults(GateOptions)
VERIFY = defaults(VerifyOptions)
NAME = "cellpuzzles-retrain"


def on_gpu(task: dsl.PipelineTask, count: int = 1) -> dsl.PipelineTask:
    """Run ``task`` on the GPU node pool: accelerator type and count, node selector, toleration."""
    task.set_accelerator_type(GPU_ACCELERATOR).set_accelerator_limit(count)
    for key, value in GPU_NODE_SELECTOR.items():
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    kubernetes.add_toleration(task, **GPU_TOLERATION)
    return task


def with_mlflow(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """MLflow credentials from the cluster secret (optional: a server without auth needs none)."""
    name, keys = MLFLOW_SECRET
    kubernetes.use_secret_as_env(task, secret_name=name, secret_key_to_env=keys, optional=True)
    return task


def uncached(task: dsl.PipelineTask) -> dsl.PipelineTask:
    return task.set_caching_options(enable_caching=False)


@dsl.pipeline(name=NAME, description="Retrain, gate and deploy a CellPuzzles cell-type annotation model.")
def retrain_pipeline(
    # data: source ("bundled" or an .h5ad path in the repository) and version (a git revision whose data.dvc to fetch)
    data_source: str = DATA["source"],
    data_version: str = DATA["version"],
    repo_dir: str = DATA["repo_dir"],
    column_map: str = DATA["column_map"],
    top_k: int = DATA["top_k"],
    # puzzles
    n_min: int = PUZZLES["n_min"],
    n_max: int = PUZZLES["n_max"],
    train_per_n: int = PUZZLES["train_per_n"],
    test_per_n: int = PUZZLES["test_per_n"],
    split_by: str = PUZZLES["split_by"],
    reasoning_fraction: float = PUZZLES["reasoning_fraction"],
    seed: int = PUZZLES["seed"],
    # distillation
    teacher: str = DISTILL["teacher"],
    teacher_base_url: str = DISTILL["base_url"],
    teacher_model: str = DISTILL["teacher_model"],
    teacher_attempts: int = DISTILL["attempts"],
    # model and training
    base_model: str = SFT_STEP["model"],
    sft_options: dict = {},  # SFTOptions fields to set, e.g. {"max_steps": 900}; the rest: the model kind's defaults
    rl_algo: str = RL["algo"],
    rl_options: dict = {},  # RLOptions fields to set, e.g. {"max_steps": 2}; the rest: the algorithm's defaults
    eval_options: dict = {},  # {"limit": K}: decode only K test puzzles (default: all)
    # gate
    model_name: str = DEFAULT_NAME,
    min_batch_accuracy: float = GATE["min_batch_accuracy"],
    min_format_ratio: float = GATE["min_format_ratio"],
    tolerance: float = GATE["tolerance"],
    gate_options: dict = {},  # other GateOptions fields, e.g. {"margin": 0.02}
    # tracking and serving
    mlflow_uri: str = "http://mlflow.cellpuzzles.svc.cluster.local:5000",
    kserve_namespace: str = "cellpuzzles",
    kserve_apply: bool = True,
    storage_uri: str = "",  # override for the model's location; default: the version's source
    artifact_store: str = "s3://cellpuzzles-mlflow/artifacts",  # the MLflow server's --artifacts-destination
    serve_gpus: int = 0,
    min_replicas: int = 1,
    max_replicas: int = 2,
    canary_percent: int = 0,
    # verify the deployment before it takes traffic (release.verify): evaluate the service over HTTP on a
    # stratified sample of the test puzzles; roll back to 'previous' below the gate's floor or when it
    # answers differently from the registered evaluation on more than verify_tolerance of them
    verify: bool = True,  # verify an applied InferenceService (its own URL), or verify_url when given
    verify_url: str = "",  # the service to verify instead (e.g. a canary's URL); "": the applied one's
    verify_sample: int = VERIFY["sample"],
    verify_tolerance: float = VERIFY["tolerance"],
):
    job = dsl.PIPELINE_JOB_NAME_PLACEHOLDER
    # the job name is a placeholder: a cache key would not see it
    final = uncached(with_mlflow(record_status(job_name=job, mlflow_uri=mlflow_uri)))
    with dsl.ExitHandler(final, name="retrain"):
        data = with_mlflow(validate(data_source=data_source, data_version=data_version, repo_dir=repo_dir,
                                    column_map=column_map, top_k=top_k, mlflow_uri=mlflow_uri))
        pz = with_mlflow(puzzles(cells=data.outputs["cells"], n_min=n_min, n_max=n_max, train_per_n=train_per_n,
                                 test_per_n=test_per_n, split_by=split_by, reasoning_fraction=reasoning_fraction,
                                 seed=seed, mlflow_uri=mlflow_uri))
        # the teachers here are rule-based (markers) or remote (openai): distill needs no GPU
        ds = with_mlflow(distill(puzzle_set=pz.outputs["puzzle_set"], teacher=teacher,
                                 teacher_base_url=teacher_base_url, teacher_model=teacher_model,
                                 attempts=teacher_attempts, student=base_model, mlflow_uri=mlflow_uri))
        name, keys = TEACHER_SECRET
        kubernetes.use_secret_as_env(ds, secret_name=name, secret_key_to_env=keys, optional=True)
        st = on_gpu(with_mlflow(sft(traces=ds.outputs["traces"], base_model=base_model, options=sft_options, seed=seed,
                                    mlflow_uri=mlflow_uri)))
        # the untrained start on the same test puzzles, constrained only (cheap): what SFT and RL added
        on_gpu(uncached(with_mlflow(evaluate_start(start=st.outputs["start"], puzzle_set=pz.outputs["puzzle_set"],
                                                   options=eval_options, seed=seed, mlflow_uri=mlflow_uri))))
        rt = on_gpu(with_mlflow(rl(puzzle_set=pz.outputs["puzzle_set"], sft_model=st.outputs["model"], algo=rl_algo,
                                   options=rl_options, seed=seed, mlflow_uri=mlflow_uri)))
        ev = on_gpu(uncached(with_mlflow(evaluate(model=rt.outputs["model"], puzzle_set=pz.outputs["puzzle_set"],
                                                  name=rl_algo, options=eval_options, seed=seed, mlflow_uri=mlflow_uri))))
        # the SFT model on the same test puzzles: did RL improve on it? (the recipe's question)
        es = on_gpu(uncached(with_mlflow(evaluate(model=st.outputs["model"], puzzle_set=pz.outputs["puzzle_set"],
                                                  name="sft", options=eval_options, seed=seed, mlflow_uri=mlflow_uri))))
        rg = uncached(with_mlflow(register(
            model=rt.outputs["model"], evaluation=ev.outputs["evaluation"], sft_evaluation=es.outputs["evaluation"],
            model_name=model_name, job_name=job,
            mlflow_uri=mlflow_uri, data_version=data.outputs["data_version"],
            validate_run=data.outputs["mlflow_run_id"], puzzles_run=pz.outputs["Output"], distill_run=ds.outputs["Output"],
            sft_run=st.outputs["Output"], rl_run=rt.outputs["Output"], evaluate_run=ev.outputs["Output"], base_model=base_model,
            rl_algo=rl_algo, seed=seed)))
        gt = uncached(with_mlflow(gate(model_name=model_name, version=rg.output, min_batch_accuracy=min_batch_accuracy,
                                       min_format_ratio=min_format_ratio, tolerance=tolerance, options=gate_options,
                                       mlflow_uri=mlflow_uri)))
        with dsl.If(gt.outputs["Output"] == "pass", name="gate-passed"):
            uncached(with_mlflow(deploy(model_name=model_name, version=rg.output, namespace=kserve_namespace,
                                        storage_uri=storage_uri, artifact_store=artifact_store, apply=kserve_apply,
                                        gpus=serve_gpus, min_replicas=min_replicas, max_replicas=max_replicas,
                                        canary_percent=canary_percent, mlflow_uri=mlflow_uri,
                                        puzzle_set=pz.outputs["puzzle_set"], verify=verify, verify_url=verify_url,
                                        verify_sample=verify_sample, verify_tolerance=verify_tolerance,
                                        min_batch_accuracy=min_batch_accuracy)))


def compile_pipeline(path: str | Path = PIPELINE_YAML) -> Path:
    """Write the pipeline package (IR YAML) that a Kubeflow endpoint runs."""
    compiler.Compiler().compile(retrain_pipeline, str(path))
    return Path(path)


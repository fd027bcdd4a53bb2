"""The release steps of the pipeline: register the evaluated model, gate it, deploy the
champion, and record the pipeline's final state — each in the pipeline run's MLflow run
(``retrain``, tagged ``kfp.job_name``), which links the step runs that made the model."""

from __future__ import annotations

from pathlib import Path

from cellpuzzles.core import atomic
from cellpuzzles.core.tracking import connect_uri, logged
from cellpuzzles.steps.common import progress

JOB_TAG = "kfp.job_name"


def pipeline_run_id(mlflow_uri: str, job_name: str, create: bool = True) -> str | None:
    """The ``retrain`` MLflow run of a pipeline run (found by its job name; made when missing)."""
    import mlflow

    connect_uri(mlflow_uri)
    exp = mlflow.get_experiment_by_name("cellpuzzles")
    found = mlflow.search_runs([exp.experiment_id], filter_string=f"tags.`{JOB_TAG}` = '{job_name}'",
                               output_format="list", max_results=1)
    if found:
        return found[0].info.run_id
    if not create:
        return None
    run = mlflow.MlflowClient().create_run(exp.experiment_id, run_name="retrain", tags={JOB_TAG: job_name})
    return run.info.run_id


def register_step(model_dir: str, eval_dir: str, model_name: str, job_name: str, mlflow_uri: str,
                  step_runs: dict[str, str], config: dict, data_version: str, sft_eval_dir: str | None = None) -> str:
    """A new version of the registered model (alias ``challenger``), tagged with lineage and, given
    the SFT model's evaluation, the paired RL-vs-SFT difference (logged on the pipeline's run too)."""
    import mlflow

    from cellpuzzles.evaluation.compare import paired_difference
    from cellpuzzles.evaluation.record import read_evaluation
    from cellpuzzles.release.registry import register

    rl_vs_sft = {}
    if sft_eval_dir:
        rl, sft = read_evaluation(eval_dir), read_evaluation(sft_eval_dir)
        rl_vs_sft = {mode: paired_difference(rl, sft, mode) for mode in rl["modes"] if mode in sft["modes"]}

    with logged("the register step"):
        run_id = pipeline_run_id(mlflow_uri, job_name)
        client = mlflow.MlflowClient()
        for step, rid in step_runs.items():
            if rid:
                client.set_tag(run_id, f"step.{step}.run_id", rid)
                # a step run made for this pipeline run nests under it; one reused from the kfp
                # cache keeps the parent that made it (the tags above still link it)
                if "mlflow.parentRunId" not in client.get_run(rid).data.tags:
                    client.set_tag(rid, "mlflow.parentRunId", run_id)
        for mode, d in rl_vs_sft.items():
            client.log_metric(run_id, f"rl_vs_sft/{mode}/batch_accuracy_diff", d["difference"])
            client.log_metric(run_id, f"rl_vs_sft/{mode}/batch_accuracy_diff_lo", d["ci"][0])
            client.log_metric(run_id, f"rl_vs_sft/{mode}/batch_accuracy_diff_hi", d["ci"][1])
            progress(f"register: RL vs SFT ({mode}) {d['after']:.3f} vs {d['before']:.3f}, "
                     f"paired difference {d['difference']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]")
        progress(f"register: {model_name} in the MLflow registry")
        version = register(model_dir, eval_dir, name=model_name, run_id=run_id,
                           tags={"data_version": data_version, "kfp.job_name": job_name,
                                 **{f"config.{k}": str(v) for k, v in config.items()},
                                 **{f"step.{k}.run_id": v for k, v in step_runs.items() if v},
                                 **{f"rl_vs_sft.{m}": f"{d['difference']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}]"
                                    for m, d in rl_vs_sft.items()}})
    return str(version)


def gate_step(model_name: str, version: str, options, report_file: str, decision_file: str, mlflow_uri: str) -> str:
    """'pass' or 'fail' (a failed gate is a decision, not an error); report and decision written."""
    from dataclasses import asdict

    from cellpuzzles.release.gate import gate

    connect_uri(mlflow_uri)
    progress(f"gate: {model_name} v{version} against the champion")
    with logged("the gate step"):
        d = gate(model_name, version, options)
    atomic.write_text(report_file, d.report)
    decision = "pass" if d.passed else "fail"
    atomic.write_json(decision_file, {"decision": decision, "version": version, "model": model_name,
                                      "reasons": list(d.reasons), "evidence": d.evidence, "options": asdict(options)})
    ev = d.evidence or {}
    why = "; ".join(d.reasons) or (f"batch accuracy {ev.get('batch_accuracy')} >= {options.min_batch_accuracy}, "
                                   + (f"not worse than champion v{ev['champion_version']}" if ev.get("champion_version")
                                      else "no champion yet"))
    progress(f"gate: {decision.upper()} — {why}")
    return decision


def record_status(mlflow_uri: str, job_name: str, state: str, error: str = "") -> None:
    """The exit handler: the pipeline's final state on its MLflow run (FAILED runs marked so)."""
    import os

    import mlflow

    failure = os.environ.get("CELLPUZZLES_FAILURE_FILE")
    if failure and Path(failure).is_file():
        error = (Path(failure).read_text().strip().splitlines() or [error])[-1]
    with logged("the exit handler"):
        run_id = pipeline_run_id(mlflow_uri, job_name)
        client = mlflow.MlflowClient()
        client.set_tag(run_id, "pipeline.state", state)
        if error:
            client.set_tag(run_id, "pipeline.error", error[:5000])
        client.set_terminated(run_id, status="FINISHED" if state == "SUCCEEDED" else "FAILED")


def deploy_step(model_name: str, version: str, namespace: str, storage_uri: str, artifact_store: str, apply: bool,
                gpus: int, min_replicas: int, max_replicas: int, canary_percent: int, manifest_file: str,
                mlflow_uri: str, verification=None, options: dict | None = None) -> str:
    """Render (and with ``apply``, apply and wait for) the champion's InferenceService; returns
    the command to apply it, or what happened on the cluster.

    ``verification`` (release.verify.VerifyOptions): before the deployment is trusted, evaluate it
    over HTTP on a stratified sample of the test puzzles and compare with the registered
    evaluation (release.verify.deploy_checked); failing, an applied deployment is rolled back to
    ``previous`` and the step fails with one line. Its ``url`` is the service to evaluate (a
    canary's, or a local server); None means the applied InferenceService's own URL, so with
    nothing applied there is nothing to verify and the message says verification was skipped.
    ``options``: other DeployOptions fields (e.g. kubeconfig, timeout_s, poll_s, runtime).

    A local MLflow store keeps the model under a file:// URI; KServe's storage initializer
    reads file:// only from a volume mounted at that path, so such a manifest is for
    inspection (a cluster pipeline logs to a server whose artifact store is s3:// or gs://)."""
    import mlflow

    from cellpuzzles.core.options import build
    from cellpuzzles.release.deploy import DeployOptions
    from cellpuzzles.release.verify import deploy_checked

    connect_uri(mlflow_uri)
    if not storage_uri and not artifact_store:
        source = mlflow.MlflowClient().get_model_version(model_name, version).source
        if source.startswith("file://"):
            storage_uri = source
    skipped = ""
    if verification is None:
        skipped = "verification skipped: turned off (verify=False)"
    elif not verification.url and not apply:
        skipped = "verification skipped: nothing was applied and no verify_url was given"
        verification = None
    progress(f"deploy: InferenceService for {model_name} v{version}" + (" (applying)" if apply else "")
             + (f"; then verifying {verification.url or 'its URL'} on {verification.sample} test puzzles"
                if verification else ""))
    r = deploy_checked(verification, build(DeployOptions, options or {}, name=model_name, version=version,
                                           namespace=namespace, storage_uri=storage_uri or None,
                                           artifact_store=artifact_store or None, gpus=gpus, min_replicas=min_replicas,
                                           max_replicas=max(max_replicas, min_replicas),
                                           canary_traffic_percent=canary_percent or None, out=manifest_file,
                                           apply=apply, tracking_uri=mlflow_uri))
    message = r.message + (f"; {skipped}" if skipped else "")
    progress(f"deploy: manifest {r.out}; {message}")
    return message

"""Commands ``register``, ``gate`` and ``deploy`` (the model's way from a folder to a service).

The tracking server is MLFLOW_TRACKING_URI or --tracking-uri. Exit codes: 0 ok, 2 error
(unreachable server, unknown model/version, missing evaluation), 4 the gate failed.
"""

from __future__ import annotations

import argparse
import json
import sys


def _tags(items: list[str]) -> dict[str, str]:
    from cellpuzzles.core.options import parse_key_value

    return dict(parse_key_value(it, "--tag", "team=annotation") for it in items)


def cmd_register(a) -> int:
    from cellpuzzles.release.registry import register

    config = None
    if a.config:
        from pathlib import Path

        from cellpuzzles.core.errors import CellPuzzlesError

        try:
            config = json.loads(Path(a.config).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CellPuzzlesError(f"--config {a.config}: not a readable JSON file ({e})") from None
    v = register(a.model_dir, a.eval_dir, name=a.name, run_id=a.run_id, tags=_tags(a.tag), config=config,
                 data_version=a.data_version, tracking_uri=a.tracking_uri)
    print(f"registered '{a.name}' version {v} (alias challenger)")
    return 0


def cmd_gate(a) -> int:
    from cellpuzzles.core import atomic
    from cellpuzzles.core.errors import GateFailed
    from cellpuzzles.release.gate import GateOptions, gate

    opt = GateOptions(min_batch_accuracy=a.min_batch_accuracy, min_format_ratio=a.min_format_ratio, mode=a.mode,
                      tolerance=a.tolerance, margin=a.margin, n_boot=a.n_boot, confidence=a.confidence, seed=a.seed,
                      peer_tolerance=a.peer_tolerance)
    d = gate(a.name, a.version or a.alias, opt, tracking_uri=a.tracking_uri)
    if a.report:
        atomic.write_text(a.report, d.report)
    print(d.report)
    if not d.passed:
        raise GateFailed(f"'{a.name}' version {d.version} not promoted: " + "; ".join(d.reasons))
    moved = ", ".join(f"{k} -> {v}" for k, v in d.moved.items()) or "no alias moved (already champion)"
    print(f"gate passed: {moved}", file=sys.stderr)
    return 0


def cmd_deploy(a) -> int:
    from cellpuzzles.release.deploy import DeployOptions
    from cellpuzzles.release.verify import VerifyOptions, deploy_checked

    given = {k: v for k, v in (("sample", a.verify_sample), ("tolerance", a.verify_tolerance)) if v is not None}
    check = VerifyOptions(url=a.verify, puzzles=a.verify_puzzles, **given) if a.verify else None
    r = deploy_checked(check, DeployOptions(
        name=a.name, version=a.version, alias=a.alias, service=a.service, namespace=a.namespace, runtime=a.runtime,
        storage_uri=a.storage_uri, artifact_store=a.artifact_store, gpus=a.gpus, cpu=a.cpu, memory=a.memory,
        min_replicas=a.min_replicas, max_replicas=a.max_replicas, canary_traffic_percent=a.canary_traffic_percent,
        service_account=a.service_account, out=a.out, apply=a.apply, kubeconfig=a.kubeconfig, timeout_s=a.timeout,
        tracking_uri=a.tracking_uri))
    print(f"wrote {r.out}: '{a.name}' version {r.version} from {r.storage_uri}")
    if r.warning:
        print(r.warning, file=sys.stderr)
    print(r.message if r.applied else f"apply it with: {r.message}")
    return 0


def add_commands(sub) -> None:
    from cellpuzzles.release.gate import GateOptions

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--name", default="cellpuzzles", help="registered model name (default cellpuzzles)")
        p.add_argument("--tracking-uri", default=None, help="MLflow server (default: MLFLOW_TRACKING_URI, else ./mlflow.db)")

    p = sub.add_parser("register", help="register a model folder + its evaluation as a new version (alias challenger)")
    p.add_argument("model_dir", help="a save_pretrained model folder")
    p.add_argument("eval_dir", help="its evaluation folder (with evaluation.json)")
    common(p)
    p.add_argument("--run-id", default=None, help="log into this MLflow run (default: a new run)")
    p.add_argument("--data-version", default=None, help="e.g. the data.dvc md5")
    p.add_argument("--config", default=None, help="a JSON file of the training config, stored as a tag")
    p.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="extra version tag (repeatable)")
    p.set_defaults(fn=cmd_register)

    d = GateOptions()
    p = sub.add_parser("gate", help="promote a version to champion if it passes the floors and the paired test; exit 4 if not")
    common(p)
    p.add_argument("--version", default=None, help="version number (default: the --alias)")
    p.add_argument("--alias", default="challenger", help="alias to gate when no --version (default challenger)")
    p.add_argument("--min-batch-accuracy", type=float, default=d.min_batch_accuracy,
                   help=f"floor (default {d.min_batch_accuracy})")
    p.add_argument("--min-format-ratio", type=float, default=d.min_format_ratio, help=f"floor (default {d.min_format_ratio})")
    p.add_argument("--mode", choices=["constrained", "free"], default=d.mode, help="served decoding mode whose metrics count")
    p.add_argument("--tolerance", type=float, default=d.tolerance,
                   help=f"largest allowed drop vs champion (default {d.tolerance})")
    p.add_argument("--margin", type=float, default=d.margin, help="require a gain of at least this instead (lower CI bound)")
    p.add_argument("--peer-tolerance", type=float, default=d.peer_tolerance,
                   help="refuse when batch accuracy is below the classical peer's (logistic regression, one-to-one) "
                        "by more than this (default: off)")
    p.add_argument("--n-boot", type=int, default=d.n_boot)
    p.add_argument("--confidence", type=float, default=d.confidence)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--report", default=None, metavar="FILE", help="also write the markdown report here")
    p.set_defaults(fn=cmd_gate)

    p = sub.add_parser("deploy", help="render (and with --apply, apply) a KServe InferenceService for a version")
    common(p)
    p.add_argument("--version", default=None, help="version number (default: the --alias)")
    p.add_argument("--alias", default="champion")
    p.add_argument("--runtime", choices=["cellpuzzles", "vllm"], default="cellpuzzles",
                   help="cellpuzzles: the project's predictor; vllm: KServe HF runtime on vLLM + the project's transformer")
    p.add_argument("--service", default="cellpuzzles", help="InferenceService name")
    p.add_argument("--namespace", default="cellpuzzles",
                   help="namespace with the cellpuzzles-runtime ServingRuntime (default cellpuzzles)")
    p.add_argument("--storage-uri", default=None, help="model location KServe fetches (overrides the version's source)")
    p.add_argument("--artifact-store", default=None, metavar="URI",
                   help="s3://|gs:// location of the MLflow server's --artifacts-destination (env CELLPUZZLES_ARTIFACT_STORE)")
    p.add_argument("--gpus", type=int, default=None, help="GPUs per replica (default 0; 1 for --runtime vllm)")
    p.add_argument("--cpu", default="2")
    p.add_argument("--memory", default="8Gi")
    p.add_argument("--min-replicas", type=int, default=1)
    p.add_argument("--max-replicas", type=int, default=1)
    p.add_argument("--canary-traffic-percent", type=int, default=None,
                   help="send this share to the new revision (Serverless mode)")
    p.add_argument("--verify", default=None, metavar="URL",
                   help="evaluate the new service at URL (its V1 route) on test puzzles before trusting it; roll back "
                        "to 'previous' when below the gate's floor or disagreeing with the registered evaluation")
    p.add_argument("--verify-puzzles", default=None, help="the test split the version was evaluated on")
    # defaults: release.verify.VerifyOptions (the one definition; not imported here, it is slow to import)
    p.add_argument("--verify-sample", type=int, default=None, help="test puzzles sent, stratified by N")
    p.add_argument("--verify-tolerance", type=float, default=None,
                   help="largest share of puzzles answered differently from the registered evaluation")
    p.add_argument("--service-account", default=None)
    p.add_argument("--out", default="inferenceservice.yaml")
    p.add_argument("--apply", action="store_true",
                   help="apply on the configured cluster, wait, roll back to 'previous' if not ready")
    p.add_argument("--kubeconfig", default=None)
    p.add_argument("--timeout", type=int, default=600, help="seconds to wait for Ready (default 600)")
    p.set_defaults(fn=cmd_deploy)

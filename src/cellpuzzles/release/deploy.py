"""Deploy a registered version as a KServe InferenceService: render the manifest, and apply
it when a cluster is configured.

Two topologies (``runtime``):
  cellpuzzles  the project's predictor (ServingRuntime ``cellpuzzles-runtime``, model format
               ``cellpuzzles``, image SERVE_IMAGE) serving the model folder;
  vllm         KServe's Hugging Face runtime on vLLM as predictor, the project's code as the
               transformer in front (deploy_vllm.py).

storageUri: a version's source is its run's ``model`` artifact. With a proxied MLflow server
that is ``mlflow-artifacts:/<experiment>/<run>/artifacts/model``, which KServe's storage
initializer cannot fetch. The server keeps it at ``<artifacts-destination>/<same path>``,
so pass that destination as ``--artifact-store s3://bucket/prefix`` (or set
``CELLPUZZLES_ARTIFACT_STORE``; infra/k8s/mlflow.yaml's ``artifacts-destination``) and the URI is rewritten;
or give ``--storage-uri`` outright.
A source that is already ``s3://``, ``gs://``, ``pvc://``, ``hf://`` or ``https://`` is used as is.

Apply (``--apply``): create or patch through KServeClient (kubeconfig or in-cluster config),
wait for Ready; if the service does not become ready, re-apply the ``previous`` version's
manifest and exit non-zero saying so.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from cellpuzzles.core.errors import CellPuzzlesError, short_reason

RUNTIME_NAME = "cellpuzzles-runtime"  # the ServingRuntime in infra/
MODEL_FORMAT = "cellpuzzles"
MLFLOW_ARTIFACTS = "mlflow-artifacts:/"
FETCHABLE = ("s3://", "gs://", "pvc://", "hf://", "https://", "http://", "hdfs://", "oci://")
ARTIFACT_STORE_ENV = "CELLPUZZLES_ARTIFACT_STORE"
VERSION_LABEL = "cellpuzzles.io/model-version"
SERVE_PORT = 8080  # the project's server containers (serving/serving-runtime.yaml, the vLLM topology's transformer)
# probes of the project's containers (serving/serving-runtime.yaml carries the same; a test compares):
# ready only once the model is loaded (/v2/health/ready), alive while it loads (/v2/health/live)
READINESS = {"path": "/v2/health/ready", "period_seconds": 5, "timeout_seconds": 2, "failure_threshold": 3}
LIVENESS = {"path": "/v2/health/live", "initial_delay_seconds": 10, "period_seconds": 15, "timeout_seconds": 5,
            "failure_threshold": 4}


@dataclass
class DeployOptions:
    """Which version to serve, where, and how big."""

    name: str = "cellpuzzles"  # registered model
    version: str | None = None  # a version number; default: the alias below
    alias: str = "champion"
    service: str = "cellpuzzles"  # InferenceService name
    namespace: str = "cellpuzzles"  # where infra/ puts the ServingRuntime
    runtime: str = "cellpuzzles"  # or "vllm"
    storage_uri: str | None = None  # overrides the version's source
    artifact_store: str | None = None  # where mlflow-artifacts:/ lives (the server's --artifacts-destination)
    gpus: int | None = None  # default: 0 for cellpuzzles, 1 for vllm
    cpu: str = "2"
    memory: str = "8Gi"
    min_replicas: int = 1
    max_replicas: int = 1
    canary_traffic_percent: int | None = None
    service_account: str | None = None
    out: str = "inferenceservice.yaml"
    apply: bool = False
    kubeconfig: str | None = None
    timeout_s: int = 600
    poll_s: float = 10.0
    tracking_uri: str | None = None


@dataclass
class DeployResult:
    version: str
    storage_uri: str
    manifest: dict
    out: Path
    applied: bool = False
    ready: bool | None = None
    rolled_back_to: str | None = None
    message: str = ""
    warning: str = ""  # e.g. a manifest rendered for inspection only (KServe could not fetch its storageUri)


def storage_uri_for(source: str, artifact_store: str | None = None) -> str:
    """A URI KServe's storage initializer can fetch, for a version's source."""
    store = artifact_store or os.environ.get(ARTIFACT_STORE_ENV)
    if source.startswith(MLFLOW_ARTIFACTS):
        if not store:
            raise CellPuzzlesError(
                f"model source {source} is served through the MLflow proxy, which KServe cannot fetch; pass "
                f"--artifact-store s3://BUCKET/PREFIX (the server's --artifacts-destination) or set {ARTIFACT_STORE_ENV}, "
                "or give --storage-uri")
        return store.rstrip("/") + "/" + source[len(MLFLOW_ARTIFACTS):].lstrip("/")
    if source.startswith(FETCHABLE):
        return source
    raise CellPuzzlesError(f"model source {source} is not a location KServe can fetch (s3://, gs://, pvc://, ...); "
                           "give --storage-uri")


def _check(service: str, runtime: str, gpus: int, min_replicas: int, max_replicas: int, canary: int | None) -> None:
    if not re.fullmatch(r"[a-z]([-a-z0-9]{0,43}[a-z0-9])?", service):
        raise CellPuzzlesError(f"--service {service!r}: use lowercase letters, digits and '-', "
                               "starting with a letter (<= 45 chars)")
    if runtime not in ("cellpuzzles", "vllm"):
        raise CellPuzzlesError(f"--runtime {runtime!r}: choose 'cellpuzzles' or 'vllm'")
    if gpus < 0 or (runtime == "vllm" and gpus < 1):
        raise CellPuzzlesError(f"--gpus {gpus}: must be >= 0, and >= 1 for --runtime vllm")
    if min_replicas < 0 or max_replicas < max(min_replicas, 1):
        raise CellPuzzlesError(f"--min-replicas {min_replicas} --max-replicas {max_replicas}: need 0 <= min <= max, max >= 1")
    if canary is not None and not 0 <= canary <= 100:
        raise CellPuzzlesError(f"--canary-traffic-percent {canary}: must be between 0 and 100")


def serving_probes() -> dict:
    """readiness_probe and liveness_probe (V1Probe) for a container running the project's server."""
    from kubernetes import client as k8s

    def probe(spec: dict):
        spec = dict(spec)
        return k8s.V1Probe(http_get=k8s.V1HTTPGetAction(path=spec.pop("path"), port=SERVE_PORT), **spec)

    return {"readiness_probe": probe(READINESS), "liveness_probe": probe(LIVENESS)}


def _resources(cpu: str, memory: str, gpus: int):
    from kubernetes import client as k8s

    from cellpuzzles.release.placement import GPU_ACCELERATOR

    want = {"cpu": cpu, "memory": memory, **({GPU_ACCELERATOR: str(gpus)} if gpus else {})}
    return k8s.V1ResourceRequirements(requests=dict(want), limits=dict(want))


def build_inference_service(service: str, storage_uri: str, *, namespace: str = "cellpuzzles", runtime: str = "cellpuzzles",
                            gpus: int | None = None, cpu: str = "2", memory: str = "8Gi", min_replicas: int = 1,
                            max_replicas: int = 1, canary_traffic_percent: int | None = None,
                            service_account: str | None = None, labels: dict[str, str] | None = None):
    """The InferenceService as KServe SDK objects (``kserve.V1beta1InferenceService``)."""
    import kserve
    from kubernetes import client as k8s

    from cellpuzzles.release.deploy_vllm import transformer_spec, vllm_predictor_model
    from cellpuzzles.release.placement import GPU_NODE_SELECTOR, GPU_TOLERATION, SERVE_IMAGE

    gpus = (1 if runtime == "vllm" else 0) if gpus is None else gpus
    _check(service, runtime, gpus, min_replicas, max_replicas, canary_traffic_percent)
    res = _resources(cpu, memory, gpus)
    if runtime == "vllm":
        model = vllm_predictor_model(storage_uri, res)
    else:
        model = kserve.V1beta1ModelSpec(name="kserve-container", model_format=kserve.V1beta1ModelFormat(name=MODEL_FORMAT),
                                        runtime=RUNTIME_NAME, image=SERVE_IMAGE, storage_uri=storage_uri, resources=res,
                                        **serving_probes())
    placement = {}
    if gpus:
        placement = {"node_selector": dict(GPU_NODE_SELECTOR), "tolerations": [k8s.V1Toleration(**GPU_TOLERATION)]}
    predictor = kserve.V1beta1PredictorSpec(model=model, min_replicas=min_replicas, max_replicas=max_replicas,
                                            canary_traffic_percent=canary_traffic_percent,
                                            service_account_name=service_account, **placement)
    transformer = None
    if runtime == "vllm":
        transformer = transformer_spec(service, namespace, SERVE_IMAGE, _resources("1", "2Gi", 0),
                                       min_replicas, max_replicas, service_account, storage_uri=storage_uri)
        for c in transformer.containers:  # the project's server: the same probes (vLLM's come from KServe's runtime)
            c.readiness_probe, c.liveness_probe = serving_probes().values()
    return kserve.V1beta1InferenceService(
        api_version=f"{kserve.constants.KSERVE_GROUP}/{kserve.constants.KSERVE_V1BETA1_VERSION}",
        kind=kserve.constants.KSERVE_KIND_INFERENCESERVICE,
        metadata=k8s.V1ObjectMeta(name=service, namespace=namespace, labels=dict(labels or {})),
        spec=kserve.V1beta1InferenceServiceSpec(predictor=predictor, transformer=transformer),
    )


def render_inference_service(service: str, storage_uri: str, **kw) -> dict:
    """The InferenceService manifest as a plain dict (camelCase keys, no nulls); see build_inference_service."""
    from kubernetes.client import ApiClient

    return ApiClient().sanitize_for_serialization(build_inference_service(service, storage_uri, **kw))


def write_manifest(manifest: dict, out: str | os.PathLike) -> Path:
    import yaml

    from cellpuzzles.core import atomic

    atomic.write_text(out, yaml.safe_dump(manifest, sort_keys=False))
    return Path(out)


def kserve_client(kubeconfig: str | None = None):
    """KServeClient on the configured cluster: ``kubeconfig``, else ~/.kube/config, else in-cluster."""
    from kserve import KServeClient
    from kubernetes.config import ConfigException

    try:
        return KServeClient(config_file=kubeconfig)
    except (ConfigException, OSError) as e:
        raise CellPuzzlesError(f"--apply: no Kubernetes cluster configured ({short_reason(e)}); pass --kubeconfig FILE, "
                               "run in a pod with a service account, or drop --apply and use kubectl") from None


def apply_and_wait(kc, manifest: dict, timeout_s: float, poll_s: float = 10.0) -> bool:
    """Create the InferenceService ``manifest`` (as rendered and written), or merge-patch it
    if it exists; True once Ready for this generation."""
    from kserve import constants
    from kubernetes.client.rest import ApiException

    name, ns = manifest["metadata"]["name"], manifest["metadata"]["namespace"]
    where = (constants.KSERVE_GROUP, constants.KSERVE_V1BETA1_VERSION, ns, constants.KSERVE_PLURAL_INFERENCESERVICE)
    try:
        kc.api_instance.get_namespaced_custom_object(*where, name)
        exists = True
    except ApiException as e:
        if e.status != 404:
            raise CellPuzzlesError(f"cannot read InferenceService {ns}/{name} ({e.status} {e.reason}); check your "
                                   "cluster access (RBAC on inferenceservices.serving.kserve.io)") from None
        exists = False
    try:
        if exists:
            out = kc.api_instance.patch_namespaced_custom_object(*where, name, manifest)
        else:
            out = kc.api_instance.create_namespaced_custom_object(*where, manifest)
    except ApiException as e:
        raise CellPuzzlesError(f"could not {'patch' if exists else 'create'} InferenceService {ns}/{name}: "
                               f"{str(e).strip().splitlines()[-1][:200]}") from None
    generation = (out.get("metadata") or {}).get("generation")
    try:
        kc.wait_isvc_ready(name, namespace=ns, timeout_seconds=timeout_s, polling_interval=poll_s,
                           expected_generation=generation)
    except RuntimeError:
        return False
    return True


def service_url(kc, namespace: str, name: str) -> str | None:
    """The URL of InferenceService ``namespace/name`` as KServe reports it once ready: the
    cluster-local address (``status.address.url``, what a pipeline pod reaches), else
    ``status.url``; the base of the V1 route ``{URL}/v1/models/cellpuzzles:predict`` (the
    transformer's, in the vLLM topology). None when it reports neither."""
    try:
        obj = kc.get(name, namespace=namespace)
    except RuntimeError:  # KServeClient wraps the API's errors
        return None
    status = (obj or {}).get("status") or {}
    return ((status.get("address") or {}).get("url") or status.get("url") or None)


def _render_version(o: DeployOptions, mv, storage_uri: str | None = None) -> tuple[str, dict, str]:
    """(storageUri, manifest, warning or "") of the InferenceService serving version ``mv``."""
    note = ""
    try:
        uri = storage_uri or storage_uri_for(mv.source, o.artifact_store)
    except CellPuzzlesError as e:
        if o.apply:
            raise
        # a local run's version (a file path, or the MLflow proxy with no store given): the manifest is
        # still worth reading, but KServe could not fetch it
        uri = mv.source
        note = f"warning: {e}. The manifest is rendered with storageUri {uri} for inspection only."
    manifest = render_inference_service(
        o.service, uri, namespace=o.namespace, runtime=o.runtime, gpus=o.gpus, cpu=o.cpu, memory=o.memory,
        min_replicas=o.min_replicas, max_replicas=o.max_replicas, canary_traffic_percent=o.canary_traffic_percent,
        service_account=o.service_account, labels={VERSION_LABEL: str(mv.version), "cellpuzzles.io/model": o.name})
    return uri, manifest, note


def deploy(options: DeployOptions) -> DeployResult:
    """Render the manifest for the chosen version (written atomically to ``options.out``); with
    ``apply``, create/patch it on the cluster, wait for Ready, and roll back to ``previous`` if not."""
    from cellpuzzles.release.registry import PREVIOUS, alias_version, client, resolve_version

    o = options
    c = client(o.tracking_uri)
    mv = resolve_version(c, o.name, o.version, None if o.version else o.alias)
    uri, manifest, note = _render_version(o, mv, o.storage_uri)
    out = write_manifest(manifest, o.out)
    result = DeployResult(version=str(mv.version), storage_uri=uri, manifest=manifest, out=out, warning=note)
    if not o.apply:
        result.message = f"kubectl apply -f {out}"
        return result
    kc = kserve_client(o.kubeconfig)
    result.applied = True
    result.ready = apply_and_wait(kc, manifest, o.timeout_s, o.poll_s)
    if result.ready:
        result.message = f"InferenceService {o.namespace}/{o.service} serves '{o.name}' version {mv.version} ({uri})"
        return result
    prev = alias_version(c, o.name, PREVIOUS)
    what = f"InferenceService {o.namespace}/{o.service} with version {mv.version} was not ready within {o.timeout_s}s"
    if not prev or prev == str(mv.version):
        raise CellPuzzlesError(f"{what}; no 'previous' version to roll back to; inspect it with "
                               f"`kubectl describe inferenceservice {o.service} -n {o.namespace}`")
    _, back, _ = _render_version(o, resolve_version(c, o.name, prev))
    ok = apply_and_wait(kc, back, o.timeout_s, o.poll_s)
    state = "ready" if ok else f"NOT ready either within {o.timeout_s}s"
    print(f"rolled back {o.namespace}/{o.service} to version {prev} ({state})", file=sys.stderr)
    raise CellPuzzlesError(f"{what}; rolled back to the previous version {prev} ({state}); "
                           f"inspect with `kubectl describe inferenceservice {o.service} -n {o.namespace}`")

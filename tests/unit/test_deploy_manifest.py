"""Deploy without a cluster or registry: InferenceService manifests for both topologies,
checked by round-tripping through the KServe SDK models, and the storageUri mapping.
(The registry lookup, the CLI and --apply: tests/integration/test_deploy.py.)"""

from __future__ import annotations

import pytest

from cellpuzzles.core.errors import CellPuzzlesError
from cellpuzzles.release.deploy import render_inference_service, storage_uri_for
from cellpuzzles.release.placement import GPU_NODE_SELECTOR, SERVE_IMAGE

from helpers.kserve_models import roundtrip


def test_render_project_predictor():
    m = render_inference_service("cellpuzzles", "s3://bkt/1/run/artifacts/model", namespace="serving", cpu="4",
                                 memory="16Gi", min_replicas=2, max_replicas=5, canary_traffic_percent=10,
                                 service_account="cellpuzzles-serve", labels={"cellpuzzles.io/model-version": "3"})
    obj = roundtrip(m)
    assert m["apiVersion"] == "serving.kserve.io/v1beta1" and m["kind"] == "InferenceService"
    assert m["metadata"] == {"labels": {"cellpuzzles.io/model-version": "3"}, "name": "cellpuzzles", "namespace": "serving"}
    p = m["spec"]["predictor"]
    assert (p["minReplicas"], p["maxReplicas"], p["canaryTrafficPercent"]) == (2, 5, 10)
    assert p["serviceAccountName"] == "cellpuzzles-serve" and "transformer" not in m["spec"]
    assert p["model"]["modelFormat"] == {"name": "cellpuzzles"} and p["model"]["runtime"] == "cellpuzzles-runtime"
    assert p["model"]["image"] == SERVE_IMAGE and p["model"]["storageUri"] == "s3://bkt/1/run/artifacts/model"
    assert p["model"]["resources"]["limits"] == {"cpu": "4", "memory": "16Gi"}
    assert "nodeSelector" not in p and "tolerations" not in p  # CPU: no GPU placement
    assert obj.spec.predictor.model.model_format.name == "cellpuzzles"

    g = render_inference_service("cellpuzzles", "gs://b/m", gpus=1)["spec"]["predictor"]
    assert g["model"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert g["nodeSelector"] == GPU_NODE_SELECTOR and g["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_render_vllm_predictor_with_project_transformer():
    m = render_inference_service("cp", "s3://bkt/model", namespace="ml", runtime="vllm", gpus=2, max_replicas=3)
    obj = roundtrip(m)
    model = m["spec"]["predictor"]["model"]
    assert model["modelFormat"] == {"name": "huggingface"} and "runtime" not in model and "image" not in model
    assert model["args"] == ["--backend=vllm", "--dtype=bfloat16", "--model_name=cellpuzzles"]
    assert model["storageUri"] == "s3://bkt/model" and model["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert m["spec"]["predictor"]["nodeSelector"] == GPU_NODE_SELECTOR
    (c,) = m["spec"]["transformer"]["containers"]
    assert c["image"] == SERVE_IMAGE
    assert c["command"] == ["cellpuzzles", "serve-transformer", "--predictor-url", "http://cp-predictor.ml/openai/v1",
                            "--model-dir", "/mnt/models", "--port", "8080"]
    # the transformer reads the served model's tokenizer and prompt options from the same storageUri
    assert c["env"] == [{"name": "STORAGE_URI", "value": "s3://bkt/model"}]
    assert "nvidia.com/gpu" not in c["resources"]["limits"] and m["spec"]["transformer"]["maxReplicas"] == 3
    assert obj.spec.transformer.containers[0].command[1] == "serve-transformer"
    assert render_inference_service("cp", "s3://b/m", runtime="vllm")["spec"]["predictor"]["model"]["resources"][
        "limits"]["nvidia.com/gpu"] == "1"  # a GPU by default


@pytest.mark.parametrize("kw, match", [
    ({"runtime": "vllm", "gpus": 0}, "--gpus 0"),
    ({"canary_traffic_percent": 150}, "between 0 and 100"),
    ({"min_replicas": 3, "max_replicas": 2}, "--min-replicas 3"),
    ({"runtime": "triton"}, "--runtime 'triton'"),
])
def test_render_rejects_bad_options(kw, match):
    with pytest.raises(CellPuzzlesError, match=match):
        render_inference_service("cellpuzzles", "s3://b/m", **kw)
    with pytest.raises(CellPuzzlesError, match="--service 'Bad_Name'"):
        render_inference_service("Bad_Name", "s3://b/m")


def test_storage_uri_mapping(monkeypatch):
    monkeypatch.delenv("CELLPUZZLES_ARTIFACT_STORE", raising=False)
    src = "mlflow-artifacts:/1/abc/artifacts/model"
    assert storage_uri_for(src, "s3://bkt/mlartifacts/") == "s3://bkt/mlartifacts/1/abc/artifacts/model"
    assert storage_uri_for("gs://b/x/model") == "gs://b/x/model"
    with pytest.raises(CellPuzzlesError, match="--artifact-store"):
        storage_uri_for(src)
    with pytest.raises(CellPuzzlesError, match="give --storage-uri"):
        storage_uri_for("file:///tmp/model")
    monkeypatch.setenv("CELLPUZZLES_ARTIFACT_STORE", "gs://g/root")
    assert storage_uri_for(src) == "gs://g/root/1/abc/artifacts/model"


def _validate_container(container: dict) -> None:
    """A rendered container (ISVC model keys dropped) against the Kubernetes schema, as a core PodTemplate."""
    import kubernetes_validate

    plain = {k: v for k, v in container.items() if k not in ("modelFormat", "runtime", "storageUri")}
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"},
                                  "template": {"spec": {"containers": [plain]}}}, "1.33.0", strict=True)


def test_project_containers_carry_readiness_and_liveness_probes_like_the_serving_runtime():
    """The rendered predictor (and the vLLM topology's transformer) probe /v2/health/ready (200 only
    once the model is loaded) and /v2/health/live, exactly as serving/serving-runtime.yaml does;
    the containers validate against the Kubernetes schema and round-trip through the KServe SDK."""
    import kubernetes_validate
    import yaml

    from cellpuzzles.release.deploy import SERVE_PORT

    from helpers.paths import ROOT

    runtime = yaml.safe_load((ROOT / "serving" / "serving-runtime.yaml").read_text())
    want = {k: runtime["spec"]["containers"][0][k] for k in ("readinessProbe", "livenessProbe")}
    assert want["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": SERVE_PORT}
    assert want["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": SERVE_PORT}

    cpu, vllm = render_inference_service("cp", "s3://b/m"), render_inference_service("cp", "s3://b/m", runtime="vllm")
    roundtrip(cpu), roundtrip(vllm)
    for container in (cpu["spec"]["predictor"]["model"], vllm["spec"]["transformer"]["containers"][0]):
        assert {k: container[k] for k in want} == want
        _validate_container(container)
    with pytest.raises(kubernetes_validate.ValidationError):  # the check does catch a broken probe
        _validate_container(dict(cpu["spec"]["predictor"]["model"], readinessProbe={"httpGet": {"path": "/x"}}))

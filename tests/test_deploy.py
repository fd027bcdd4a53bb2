"""Deploy: InferenceService manifests for both topologies, checked by round-tripping through
the KServe SDK models; the registry lookup and storageUri mapping against a real MLflow
server; and --apply against a local HTTP stand-in of the Kubernetes API.

The stand-in (KubeStandIn) exists only because no Kubernetes cluster can run here: it
serves just the InferenceService endpoints KServeClient calls (GET, POST, merge PATCH),
bumps metadata.generation, and reports Ready unless the test marks a storageUri as broken.
It checks our create/patch/wait/rollback logic and the requests we send, not KServe itself.
No InferenceService CRD schema is available offline (not in the kserve package), so the
manifests are checked against the SDK models only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import kserve
import pytest
import yaml
from kubernetes.client import ApiClient

from cellpuzzles.release.placement import GPU_NODE_SELECTOR, SERVE_IMAGE
from cellpuzzles.release.deploy import DeployOptions, deploy, render_inference_service, storage_uri_for
from cellpuzzles.core.errors import CellPuzzlesError
from cellpuzzles.release.gate import gate

from test_registry_gate import add_version, make_test_set, mlflow_server  # noqa: F401  (fixture)


def from_dict(data, klass: str):
    """Build SDK objects from a manifest by their openapi_types (kserve models, then Kubernetes
    models), rejecting any key the models do not declare. kserve.ApiClient().deserialize cannot
    do this: it looks nested Kubernetes types (V1ObjectMeta) up in kserve.models only."""
    import re

    import kubernetes.client.models as k8s_models

    if klass.startswith("list["):
        assert isinstance(data, list), (klass, data)
        return [from_dict(d, klass[5:-1]) for d in data]
    if klass.startswith("dict("):
        sub = re.match(r"dict\(([^,]*), (.*)\)", klass).group(2)
        return {k: from_dict(v, sub) for k, v in data.items()}
    native = {"str": str, "int": int, "float": (int, float), "bool": bool, "object": object}
    if klass in native:
        assert isinstance(data, native[klass]), (klass, data)
        return data
    cls = getattr(kserve.models, klass, None) or getattr(k8s_models, klass)
    by_json = {cls.attribute_map[a]: (a, t) for a, t in cls.openapi_types.items()}
    unknown = set(data) - set(by_json)
    assert not unknown, f"{klass} has no field(s) {unknown}"
    return cls(**{by_json[k][0]: from_dict(v, by_json[k][1]) for k, v in data.items()})


def roundtrip(manifest: dict) -> kserve.V1beta1InferenceService:
    """Deserialize into the KServe SDK models (field names, types, required fields) and back."""
    obj = from_dict(manifest, "V1beta1InferenceService")
    assert ApiClient().sanitize_for_serialization(obj) == manifest
    return obj


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
                            "--port", "8080"]
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


@pytest.fixture(scope="module")
def two_versions(mlflow_server, tmp_path_factory):  # noqa: F811
    """'dep' v1 (previous) and v2 (champion), promoted by the real gate."""
    tmp = tmp_path_factory.mktemp("versions")
    ps = make_test_set()
    v1 = add_version(tmp, "dep", "v1", ps, set(range(20)))
    assert gate("dep", v1).passed
    v2 = add_version(tmp, "dep", "v2", ps, set(range(30)))
    assert gate("dep", v2).passed
    return mlflow_server


def test_deploy_champion_with_mapped_uri(two_versions, tmp_path):
    store = two_versions["artifacts"].as_uri()  # the server's --artifacts-destination
    r = deploy(DeployOptions(name="dep", artifact_store=store, out=str(tmp_path / "isvc.yaml")))
    assert r.version == "2" and not r.applied and r.message == f"kubectl apply -f {tmp_path / 'isvc.yaml'}"
    assert r.storage_uri.startswith(store) and r.storage_uri.endswith("/artifacts/model")
    # the mapping rule is the server's layout: the rewritten URI holds the model folder
    assert (Path(r.storage_uri.removeprefix("file://")) / "config.json").is_file()
    on_disk = yaml.safe_load((tmp_path / "isvc.yaml").read_text())
    assert on_disk == r.manifest and roundtrip(on_disk).metadata.labels["cellpuzzles.io/model-version"] == "2"
    old = deploy(DeployOptions(name="dep", version="1", storage_uri="s3://bkt/v1", out=str(tmp_path / "v1.yaml")))
    assert old.version == "1" and old.manifest["spec"]["predictor"]["model"]["storageUri"] == "s3://bkt/v1"


def test_cli_deploy(two_versions, tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": two_versions["uri"]}
    env.pop("CELLPUZZLES_ARTIFACT_STORE", None)
    cli = [sys.executable, "-m", "cellpuzzles.cli", "deploy", "--name", "dep"]
    r = subprocess.run([*cli, "--out", "x.yaml"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--artifact-store" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.yaml").exists()
    r = subprocess.run([*cli, "--runtime", "vllm", "--artifact-store", "s3://bkt/ml", "--gpus", "1", "--canary-traffic-percent",
                        "20", "--out", "x.yaml"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "kubectl apply -f x.yaml" in r.stdout
    m = yaml.safe_load((tmp_path / "x.yaml").read_text())
    assert m["spec"]["predictor"]["canaryTrafficPercent"] == 20
    assert m["spec"]["predictor"]["model"]["storageUri"].startswith("s3://bkt/ml/")


class KubeStandIn:
    """Stand-in for the Kubernetes API (no cluster can run here): InferenceService GET/POST/PATCH."""

    PREFIX = "/apis/serving.kserve.io/v1beta1/namespaces/"

    def __init__(self):
        self.objects: dict[tuple[str, str], dict] = {}
        self.broken: set[str] = set()  # storageUris that never become Ready
        self.requests: list[tuple[str, str, str]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, obj):
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _key(self):
                parts = self.path.split("?")[0].removeprefix(outer.PREFIX).split("/")
                return parts[0], parts[2] if len(parts) > 2 else None

            def _body(self):
                return json.loads(self.rfile.read(int(self.headers["Content-Length"])))

            def do_GET(self):
                outer.requests.append(("GET", self.path, ""))
                ns, name = self._key()
                obj = outer.objects.get((ns, name))
                if obj is None:
                    return self._send(404, {"kind": "Status", "reason": "NotFound", "code": 404})
                uri = obj["spec"]["predictor"]["model"]["storageUri"]
                ready = "False" if uri in outer.broken else "True"
                self._send(200, {**obj, "status": {"observedGeneration": obj["metadata"]["generation"],
                                                   "conditions": [{"type": "Ready", "status": ready}]}})

            def do_POST(self):
                outer.requests.append(("POST", self.path, self.headers["Content-Type"]))
                ns, _ = self._key()
                obj = self._body()
                obj["metadata"]["generation"] = 1
                outer.objects[(ns, obj["metadata"]["name"])] = obj
                self._send(201, obj)

            def do_PATCH(self):
                outer.requests.append(("PATCH", self.path, self.headers["Content-Type"]))
                ns, name = self._key()
                obj = merge_patch(outer.objects[(ns, name)], self._body())
                obj["metadata"]["generation"] += 1
                outer.objects[(ns, name)] = obj
                self._send(200, obj)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def kubeconfig(self, path: Path) -> Path:
        url = f"http://127.0.0.1:{self.server.server_address[1]}"
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "standin",
            "clusters": [{"name": "standin", "cluster": {"server": url}}],
            "users": [{"name": "u", "user": {"token": "test"}}],
            "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "u"}}]}))
        return path


def merge_patch(target: dict, patch: dict) -> dict:
    """RFC 7386 JSON merge patch."""
    out = dict(target)
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_patch(out[k], v)
        else:
            out[k] = v
    return out


def test_apply_creates_patches_waits_and_rolls_back(two_versions, tmp_path):
    kube = KubeStandIn()
    try:
        store = "s3://bkt/ml"
        opts = dict(name="dep", namespace="serving", artifact_store=store, apply=True,
                    kubeconfig=str(kube.kubeconfig(tmp_path / "kubeconfig")), timeout_s=1, poll_s=0.2)
        r1 = deploy(DeployOptions(version="1", out=str(tmp_path / "v1.yaml"), **opts))
        assert r1.applied and r1.ready and "serves 'dep' version 1" in r1.message
        assert [m for m, _, _ in kube.requests[:2]] == ["GET", "POST"]  # not there yet: create
        v1_uri = r1.storage_uri

        champion = deploy(DeployOptions(version="2", out=str(tmp_path / "probe.yaml"), **{**opts, "apply": False}))
        kube.broken.add(champion.storage_uri)  # version 2's pods never become ready
        with pytest.raises(CellPuzzlesError, match="version 2 was not ready within 1s; rolled back to the previous version 1 \\(ready\\)"):
            deploy(DeployOptions(out=str(tmp_path / "v2.yaml"), **opts))
        patches = [(p, ct) for m, p, ct in kube.requests if m == "PATCH"]
        assert len(patches) == 2 and all(ct == "application/merge-patch+json" for _, ct in patches)
        live = kube.objects[("serving", "cellpuzzles")]
        assert live["spec"]["predictor"]["model"]["storageUri"] == v1_uri
        assert live["metadata"]["labels"]["cellpuzzles.io/model-version"] == "1" and live["metadata"]["generation"] == 3
        assert yaml.safe_load((tmp_path / "v2.yaml").read_text())["metadata"]["labels"]["cellpuzzles.io/model-version"] == "2"
    finally:
        kube.server.shutdown()


def test_apply_without_cluster_is_one_clear_error(two_versions, tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))
    with pytest.raises(CellPuzzlesError, match="no Kubernetes cluster configured"):
        deploy(DeployOptions(name="dep", storage_uri="s3://b/m", apply=True, kubeconfig=str(tmp_path / "missing"),
                             out=str(tmp_path / "x.yaml")))

"""Deploy against a real MLflow server: the registry lookup and storageUri mapping, the
`cellpuzzles deploy` CLI, and --apply against a local HTTP stand-in of the Kubernetes API
(tests/helpers/kube_standin.py: no Kubernetes cluster can run here; it checks our
create/patch/wait/rollback logic and the requests we send, not KServe itself).
No InferenceService CRD schema is available offline (not in the kserve package), so the
manifests are checked against the KServe SDK models only (tests/unit/test_deploy_manifest.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from cellpuzzles.core.errors import CellPuzzlesError
from cellpuzzles.release.deploy import DeployOptions, deploy
from cellpuzzles.release.gate import gate

from helpers.cli import run_cli
from helpers.kserve_models import roundtrip
from helpers.kube_standin import KubeStandIn
from helpers.registry import add_version, make_test_set

pytestmark = pytest.mark.slow  # every test needs the module's MLflow server and two registered versions


@pytest.fixture(scope="module")
def two_versions(mlflow_server, tmp_path_factory):
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
    cli = ["deploy", "--name", "dep"]
    # a source KServe cannot fetch (the MLflow proxy, no store given): rendered for inspection, with
    # a one-line warning; applying it is refused
    r = run_cli(*cli, "--out", "x.yaml", cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 0 and "--artifact-store" in r.stderr and "for inspection only" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and (tmp_path / "x.yaml").is_file()
    (tmp_path / "x.yaml").unlink()
    r = run_cli(*cli, "--out", "x.yaml", "--apply", cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 2 and "--artifact-store" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.yaml").exists()
    r = run_cli(*cli, "--runtime", "vllm", "--artifact-store", "s3://bkt/ml", "--gpus", "1", "--canary-traffic-percent",
                "20", "--out", "x.yaml", cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "kubectl apply -f x.yaml" in r.stdout
    m = yaml.safe_load((tmp_path / "x.yaml").read_text())
    assert m["spec"]["predictor"]["canaryTrafficPercent"] == 20
    assert m["spec"]["predictor"]["model"]["storageUri"].startswith("s3://bkt/ml/")


def test_apply_creates_patches_waits_and_rolls_back(two_versions, tmp_path):
    with KubeStandIn() as kube:
        store = "s3://bkt/ml"
        opts = dict(name="dep", namespace="serving", artifact_store=store, apply=True,
                    kubeconfig=str(kube.kubeconfig(tmp_path / "kubeconfig")), timeout_s=1, poll_s=0.2)
        r1 = deploy(DeployOptions(version="1", out=str(tmp_path / "v1.yaml"), **opts))
        assert r1.applied and r1.ready and "serves 'dep' version 1" in r1.message
        assert [m for m, _, _ in kube.requests[:2]] == ["GET", "POST"]  # not there yet: create
        v1_uri = r1.storage_uri

        champion = deploy(DeployOptions(version="2", out=str(tmp_path / "probe.yaml"), **{**opts, "apply": False}))
        kube.broken.add(champion.storage_uri)  # version 2's pods never become ready
        with pytest.raises(CellPuzzlesError,
                           match="version 2 was not ready within 1s; rolled back to the previous version 1 \\(ready\\)"):
            deploy(DeployOptions(out=str(tmp_path / "v2.yaml"), **opts))
        patches = [(p, ct) for m, p, ct in kube.requests if m == "PATCH"]
        assert len(patches) == 2 and all(ct == "application/merge-patch+json" for _, ct in patches)
        live = kube.objects[("serving", "cellpuzzles")]
        assert live["spec"]["predictor"]["model"]["storageUri"] == v1_uri
        assert live["metadata"]["labels"]["cellpuzzles.io/model-version"] == "1" and live["metadata"]["generation"] == 3
        assert yaml.safe_load((tmp_path / "v2.yaml").read_text())["metadata"]["labels"]["cellpuzzles.io/model-version"] == "2"


def test_apply_without_cluster_is_one_clear_error(two_versions, tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))
    with pytest.raises(CellPuzzlesError, match="no Kubernetes cluster configured"):
        deploy(DeployOptions(name="dep", storage_uri="s3://b/m", apply=True, kubeconfig=str(tmp_path / "missing"),
                             out=str(tmp_path / "x.yaml")))

"""infra/: Dockerfiles lint clean, manifests validate, and everything agrees with placement.py.

What runs for real here (hadolint on each Dockerfile: tests/integration/test_hadolint.py);
kubernetes-validate on every core-kind
document against its bundled (offline) schemas for K8S_VERSION, in strict mode; the KServe SDK
models for the ServingRuntime; python-hcl2 on the Terraform; the project's own argument parser
on the commands the manifests run; MLflow's own Host-header check on the tracking URI.

What cannot run here and is checked structurally instead: there is no Docker daemon (images are
not built), no Kubernetes cluster (nothing is applied), no terraform binary (no plan), and
kubernetes-validate ships no CRD schemas, so CRD kinds (ServingRuntime, PyTorchJob) are skipped
by it on purpose: the pod templates inside them are validated as core PodTemplates instead.
"""

from __future__ import annotations

import configparser
import json
import re
import socket
from pathlib import Path
from urllib.parse import urlsplit

import hcl2
import kubernetes.client
import kubernetes_validate
import pytest
import yaml

from cellpuzzles.release import placement

from helpers.kserve_models import from_dict, to_dict
from helpers.paths import DOCKERFILES, INFRA, ROOT

MANIFESTS = sorted((INFRA / "k8s").glob("*.yaml")) + [ROOT / "serving" / "serving-runtime.yaml"]  # serving/ keeps its runtime
TERRAFORM = INFRA / "terraform" / "gke-gpu-nodepool"

K8S_VERSION = "1.33.0"  # the cluster version the manifests are written for (GKE regular channel)
NAMESPACE = "cellpuzzles"
CORE_KINDS = {"Namespace", "Deployment", "Service", "PersistentVolumeClaim", "StatefulSet", "ServiceAccount",
              "Role", "RoleBinding", "Secret", "ConfigMap"}
CRD_KINDS = {"ServingRuntime", "PyTorchJob"}
SERVE_COMMAND = ["cellpuzzles", "serve", "--model", "/mnt/models", "--port", "8080", "--host", "0.0.0.0"]
# Variables the Training Operator (v1.7+) puts in every PyTorchJob container (no elasticPolicy).
PYTORCHJOB_ENV = {"MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "PET_NNODES", "PET_NODE_RANK",
                  "PET_NPROC_PER_NODE", "PYTHONUNBUFFERED"}


# ---------------------------------------------------------------- helpers

def _docs() -> list[dict]:
    out = []
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                doc["__file__"] = path.name
                out.append(doc)
    return out


DOCS = _docs()


def _plain(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if k != "__file__"}


def _one(kind: str, name: str) -> dict:
    found = [d for d in DOCS if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name} in infra/k8s or serving/, found {len(found)}"
    return found[0]


def _pod_specs() -> list[tuple[str, dict]]:
    """(where, pod spec) for every pod the manifests start."""
    out = []
    for d in DOCS:
        where = f"{d['__file__']}:{d['kind']}/{d['metadata']['name']}"
        if d["kind"] in {"Deployment", "StatefulSet"}:
            out.append((where, d["spec"]["template"]["spec"]))
        elif d["kind"] == "PyTorchJob":
            for role, rs in d["spec"]["pytorchReplicaSpecs"].items():
                out.append((f"{where}:{role}", rs["template"]["spec"]))
        elif d["kind"] == "ServingRuntime":
            out.append((where, {"containers": d["spec"]["containers"]}))
    return out


def _validate_core(doc: dict) -> None:
    kubernetes_validate.validate(_plain(doc), K8S_VERSION, strict=True)


def _as_pod_template(name: str, template: dict) -> dict:
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name, "namespace": NAMESPACE},
            "template": template}


def _hcl_str(value):
    """python-hcl2 keeps the quotes of string literals."""
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def _hcl_clean(obj):
    if isinstance(obj, dict):
        return {_hcl_str(k): _hcl_clean(v) for k, v in obj.items() if k not in ("__is_block__", "__comments__")}
    if isinstance(obj, list):
        return [_hcl_clean(v) for v in obj]
    return _hcl_str(obj)


def _terraform() -> dict:
    merged: dict = {}
    for tf in sorted(TERRAFORM.glob("*.tf")):
        with tf.open() as f:
            for key, blocks in _hcl_clean(hcl2.load(f)).items():
                merged.setdefault(key, []).extend(blocks)
    return merged


def _node_pool() -> dict:
    pools = [r["google_container_node_pool"] for r in _terraform()["resource"] if "google_container_node_pool" in r]
    assert len(pools) == 1 and len(pools[0]) == 1, "expected one google_container_node_pool"
    return next(iter(pools[0].values()))


def _dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        buf += line.rstrip()
        if buf.endswith("\\"):
            buf = buf[:-1] + " "
            continue
        if buf.strip():
            ins, _, args = buf.strip().partition(" ")
            out.append((ins.upper(), args.strip()))
        buf = ""
    return out


def _exec_form(path: Path, instruction: str) -> list[str]:
    found = [json.loads(a) for i, a in _dockerfile(path) if i == instruction]
    assert found, f"{path.name}: no {instruction}"
    return found[-1]


def _role_allows(role: dict, group: str, resource: str, verb: str, name: str | None = None) -> bool:
    for rule in role["rules"]:
        if group in rule["apiGroups"] and resource in rule["resources"] and verb in rule["verbs"]:
            if "resourceNames" not in rule or name in rule["resourceNames"]:
                return True
    return False


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# ---------------------------------------------------------------- Dockerfiles

def test_dockerfiles_present():
    assert {p.name for p in DOCKERFILES} >= {"cpu.Dockerfile", "train.Dockerfile", "serve.Dockerfile"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_pins_base_and_drops_root(dockerfile):
    lines = dockerfile.read_text().splitlines()
    for i, line in enumerate(lines):  # an inline ignore must say why, on the comment line before it
        if "hadolint ignore" in line:
            assert i > 0 and lines[i - 1].lstrip().startswith("#") and "hadolint" not in lines[i - 1], (
                f"{dockerfile.name}:{i + 1}: explain the ignored rule on the line above")
    instructions = _dockerfile(dockerfile)
    for ins, args in instructions:
        if ins == "FROM":
            image = args.split()[0]
            assert re.search(r":[^:/]*\d+\.\d+", image), f"{dockerfile.name}: base image {image} is not pinned"
    user = [a for i, a in instructions if i == "USER"][-1]
    assert user not in {"root", "0"}, f"{dockerfile.name}: runs as root"


@pytest.mark.parametrize("name,extras,torch_index", [
    ("cpu.Dockerfile", {"train", "pipeline", "serve"}, "whl/cpu"),
    ("train.Dockerfile", {"train", "pipeline", "gpu"}, "whl/cu"),
    ("serve.Dockerfile", {"train", "serve"}, "whl/cpu"),
])
def test_dockerfile_installs_torch_then_project(name, extras, torch_index):
    path = INFRA / "docker" / name
    text = " ".join(a for i, a in _dockerfile(path) if i in {"RUN", "ARG"})
    torch = text.find("torch==2.13.0")
    project = re.search(r'"/opt/cellpuzzles\[([a-z,]+)\]"', text)
    assert torch >= 0 and project and torch < project.start(), f"{name}: pin torch==2.13.0 before the project"
    assert set(project.group(1).split(",")) == extras
    assert torch_index in text, f"{name}: torch must come from the {torch_index} index"
    for ins, args in _dockerfile(path):  # what the install needs is copied into /opt/cellpuzzles
        if ins == "COPY":
            assert args.split()[0] in {"pyproject.toml", "src", "components", "pipelines"}
    ignore = (INFRA / "docker" / f"{name}.dockerignore").read_text().split()
    assert ignore[ignore.index("*"):].count("*") == 1 and "!src/" in ignore  # context: only what is installed


def _installed_extras(path: Path) -> set[str]:
    text = " ".join(a for i, a in _dockerfile(path) if i == "RUN")
    return set(re.search(r'"/opt/cellpuzzles\[([a-z,]+)\]"', text).group(1).split(","))


@pytest.mark.parametrize("name,image", [("cpu.Dockerfile", placement.CPU_IMAGE),
                                        ("train.Dockerfile", placement.TRAIN_IMAGE),
                                        ("serve.Dockerfile", placement.SERVE_IMAGE)])
def test_each_placement_image_provides_what_runs_in_it(name, image):
    """Whatever the compiled pipeline and the manifests run in a placement image, its Dockerfile
    provides: KFP steps run KFP's executor with the image's python3 (the pipeline extra); a step
    or pod given a GPU needs the CUDA base image and the CUDA torch build of that CUDA major;
    torchrun with DeepSpeed needs the gpu extra; `cellpuzzles serve` needs the serve extra and
    the container port exposed."""
    path = INFRA / "docker" / name
    instructions = _dockerfile(path)
    extras = _installed_extras(path)
    base = [a for i, a in instructions if i == "FROM"][-1].split()[0]
    spec = next(yaml.safe_load_all((ROOT / "pipelines" / "retrain.yaml").read_text()))
    steps = {k: e["container"] for k, e in spec["deploymentSpec"]["executors"].items()
             if e["container"]["image"] == image}
    pods = [(where, c) for where, pod in _pod_specs() for c in pod["containers"] if c["image"] == image]
    assert steps or pods, f"nothing in pipelines/retrain.yaml or infra/k8s runs {image}"

    if steps:
        assert "pipeline" in extras, f"{name}: KFP steps {sorted(steps)} need kfp (the pipeline extra)"
        for k, c in steps.items():
            assert "kfp.dsl.executor_main" in " ".join(c["command"] + c.get("args", [])), k
    gpu = [k for k, c in steps.items() if "accelerator" in c.get("resources", {})]
    gpu += [w for w, c in pods if placement.GPU_ACCELERATOR in c.get("resources", {}).get("limits", {})]
    if gpu:
        cuda = re.fullmatch(r"nvidia/cuda:(\d+)\.\d+\.\d+-[\w.-]+", base)
        assert cuda, f"{name}: {gpu} get a GPU but the base image {base} has no CUDA"
        index = dict(a.split("=", 1) for i, a in instructions if i == "ARG" and "=" in a)["TORCH_INDEX_URL"]
        wheels = re.search(r"/whl/cu(\d+)(\d)$", index)
        assert wheels and wheels.group(1) == cuda.group(1), f"{name}: torch from {index} on {base}"
    else:
        assert not base.startswith("nvidia/"), f"{name}: nothing in {image} gets a GPU, yet it is built on {base}"
    if any(c.get("command", [None])[0] == "torchrun" for _, c in pods):
        assert "gpu" in extras, f"{name}: torchrun runs DeepSpeed (the gpu extra)"
    served = [c for _, c in pods if (c.get("command", []) + c.get("args", []))[:2] == ["cellpuzzles", "serve"]]
    if served:
        exposed = {int(p) for i, a in instructions if i == "EXPOSE" for p in a.split()}
        ports = {p["containerPort"] for c in served for p in c["ports"]}
        assert "serve" in extras and ports <= exposed, f"{name}: serve extra, EXPOSE {sorted(ports)}"


def test_serve_image_entry_point_matches_runtime():
    path = INFRA / "docker" / "serve.Dockerfile"
    assert _exec_form(path, "ENTRYPOINT") + _exec_form(path, "CMD") == SERVE_COMMAND
    container = _one("ServingRuntime", "cellpuzzles-runtime")["spec"]["containers"][0]
    assert container["command"] + container["args"] == SERVE_COMMAND


# ---------------------------------------------------------------- core kinds: kubernetes-validate

def test_every_manifest_kind_is_checked_somewhere():
    kinds = {d["kind"] for d in DOCS}
    assert kinds <= CORE_KINDS | CRD_KINDS, f"unchecked kinds: {kinds - CORE_KINDS - CRD_KINDS}"
    assert {"Deployment", "Service", "PersistentVolumeClaim", "ServiceAccount", "Role", "RoleBinding",
            "Secret", "ServingRuntime", "PyTorchJob"} <= kinds


@pytest.mark.parametrize("doc", [d for d in DOCS if d["kind"] in CORE_KINDS],
                         ids=lambda d: f"{d['__file__']}:{d['kind']}/{d['metadata']['name']}")
def test_core_kind_validates(doc, no_network):
    _validate_core(doc)
    if doc["kind"] != "Namespace":
        assert doc["metadata"]["namespace"] == NAMESPACE


@pytest.mark.parametrize("doc", [d for d in DOCS if d["kind"] in CRD_KINDS],
                         ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_crd_kinds_have_no_bundled_schema(doc, no_network):
    """kubernetes-validate cannot check CRDs: confirm that is why they are skipped there."""
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        _validate_core(doc)
    assert doc["metadata"]["namespace"] == NAMESPACE


@pytest.mark.parametrize("where,spec", _pod_specs(), ids=lambda x: x if isinstance(x, str) else "")
def test_every_pod_spec_validates_as_core_pod_template(where, spec, no_network):
    _validate_core(_as_pod_template("check", {"metadata": {"labels": {"a": "b"}}, "spec": spec}))


def test_validator_rejects_broken_documents(no_network):
    """The same offline validation fails on a typo and on a wrong type."""
    deployment = _plain(_one("Deployment", "mlflow"))
    typo = json.loads(json.dumps(deployment))
    typo["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    wrong_type = json.loads(json.dumps(deployment))
    wrong_type["spec"]["replicas"] = "one"
    for bad in (typo, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_references_between_manifests_resolve():
    """Every secret key, config map key, claim, service account and Service target exists."""
    secrets = {d["metadata"]["name"]: set(d.get("stringData", {})) | set(d.get("data", {}))
               for d in DOCS if d["kind"] == "Secret"}
    configmaps = {d["metadata"]["name"]: set(d.get("data", {})) for d in DOCS if d["kind"] == "ConfigMap"}
    claims = {d["metadata"]["name"] for d in DOCS if d["kind"] == "PersistentVolumeClaim"}
    accounts = {d["metadata"]["name"] for d in DOCS if d["kind"] == "ServiceAccount"}
    for where, spec in _pod_specs():
        if "serviceAccountName" in spec:
            assert spec["serviceAccountName"] in accounts, where
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for v in volumes.values():
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims, where
            if "configMap" in v:
                assert {i["key"] for i in v["configMap"].get("items", [])} <= configmaps[v["configMap"]["name"]]
        for c in spec["containers"]:
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes, f"{where}: mount {m['name']} has no volume"
            for e in c.get("env", []):
                ref = e.get("valueFrom", {})
                if "secretKeyRef" in ref:
                    s = ref["secretKeyRef"]
                    assert s["key"] in secrets.get(s["name"], set()), f"{where}: secret {s['name']}/{s['key']}"
                if "configMapKeyRef" in ref:
                    cm = ref["configMapKeyRef"]
                    assert cm["key"] in configmaps.get(cm["name"], set()), f"{where}: config map {cm['name']}"
    for svc in (d for d in DOCS if d["kind"] == "Service"):
        targets = [d for d in DOCS if d["kind"] == "Deployment"
                   and svc["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(targets) == 1, f"Service {svc['metadata']['name']} selects {len(targets)} Deployments"
        ports = {p.get("name") for c in targets[0]["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in ports


# ---------------------------------------------------------------- placement.py agreement

def test_secrets_are_placeholders_matching_placement():
    for name, keys in (placement.TEACHER_SECRET, placement.MLFLOW_SECRET):
        secret = _one("Secret", name)
        assert set(secret["stringData"]) == set(keys), f"secret {name}: keys must be {sorted(keys)}"
    for secret in (d for d in DOCS if d["kind"] == "Secret"):
        assert "data" not in secret
        for key, value in secret["stringData"].items():
            assert value.startswith("REPLACE_WITH_"), f"{secret['metadata']['name']}/{key} holds a real value?"


def test_rbac_lets_pipeline_account_manage_inferenceservices():
    account = _one("ServiceAccount", placement.PIPELINE_SERVICE_ACCOUNT)
    binding = next(d for d in DOCS if d["kind"] == "RoleBinding"
                   and {"kind": "ServiceAccount", "name": placement.PIPELINE_SERVICE_ACCOUNT,
                        "namespace": account["metadata"]["namespace"]} in d["subjects"])
    assert binding["roleRef"]["kind"] == "Role" and binding["metadata"]["namespace"] == NAMESPACE
    role = _one("Role", binding["roleRef"]["name"])
    for verb in ("get", "list", "watch", "create", "patch", "update", "delete"):
        assert _role_allows(role, "serving.kserve.io", "inferenceservices", verb), verb
    assert _role_allows(role, "", "pods", "watch")
    assert not _role_allows(role, "", "secrets", "get", placement.TEACHER_SECRET[0])  # least privilege
    assert not _role_allows(role, "serving.kserve.io", "servingruntimes", "delete")


def test_pytorchjob_places_on_gpu_pool_with_train_image():
    job = _one("PyTorchJob", "cellpuzzles-sft-multinode")
    assert job["apiVersion"] == "kubeflow.org/v1"
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"}
    assert sum(r["replicas"] for r in replicas.values()) == 2  # nodes
    for role, rs in replicas.items():
        spec = rs["template"]["spec"]
        assert spec["nodeSelector"] == placement.GPU_NODE_SELECTOR, role
        assert placement.GPU_TOLERATION in spec["tolerations"], role
        assert spec["serviceAccountName"] == placement.PIPELINE_SERVICE_ACCOUNT
        (c,) = spec["containers"]
        assert c["name"] == "pytorch"  # the Training Operator finds the container by this name
        assert c["image"] == placement.TRAIN_IMAGE
        gpus = c["resources"]["limits"][placement.GPU_ACCELERATOR]
        assert int(gpus) == 8 == int(job["spec"]["nprocPerNode"])


def test_pytorchjob_command_is_a_valid_deepspeed_sft_run():
    from cellpuzzles.cli.main import build_parser

    job = _one("PyTorchJob", "cellpuzzles-sft-multinode")
    spec = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    (c,) = spec["containers"]
    cmd = c["command"]
    assert cmd[0] == "torchrun" and "--no-python" in cmd
    launcher, program = cmd[1:cmd.index("--no-python")], cmd[cmd.index("--no-python") + 1:]
    used = set(re.findall(r"\$\((\w+)\)", " ".join(cmd)))
    assert used <= PYTORCHJOB_ENV | {e["name"] for e in c.get("env", [])}, used
    assert {a.split("=")[0] for a in launcher} >= {"--nnodes", "--node-rank", "--nproc-per-node",
                                                   "--master-addr", "--master-port"}
    assert program[0] == "cellpuzzles"
    args = build_parser().parse_args(program[1:])  # the real CLI accepts these flags
    assert args.command == "sft"
    assert args.deepspeed == "zero3" and args.use_lora is False
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    for path in (args.traces, args.model, args.out):  # all on the shared volume
        mount = next(m for m in mounts if path.startswith(m + "/"))
        claim = volumes[mounts[mount]]["persistentVolumeClaim"]["claimName"]
        assert "ReadWriteMany" in _one("PersistentVolumeClaim", claim)["spec"]["accessModes"]


def test_serving_runtime_through_kserve_sdk():
    doc = _plain(_one("ServingRuntime", "cellpuzzles-runtime"))
    runtime = from_dict(doc, "V1alpha1ServingRuntime")
    assert to_dict(runtime) == doc  # nothing dropped or changed on the way through the models
    assert runtime.api_version == "serving.kserve.io/v1alpha1" and runtime.kind == "ServingRuntime"
    fmt = runtime.spec.supported_model_formats
    assert [(f.name, f.version, f.auto_select) for f in fmt] == [("cellpuzzles", "1", True)]
    (c,) = runtime.spec.containers
    assert isinstance(c, kubernetes.client.V1Container)
    assert c.name == "kserve-container" and c.image == placement.SERVE_IMAGE
    assert [p.container_port for p in c.ports] == [8080]
    assert c.resources.requests and c.resources.limits
    assert c.command + c.args == SERVE_COMMAND


def test_kserve_sdk_check_catches_typos_and_missing_fields():
    doc = _plain(_one("ServingRuntime", "cellpuzzles-runtime"))
    typo = json.loads(json.dumps(doc))
    typo["spec"]["supportedModelFormats"][0]["autoselect"] = typo["spec"]["supportedModelFormats"][0].pop("autoSelect")
    with pytest.raises(ValueError, match="V1alpha1ServingRuntime.*no field.*autoselect|autoselect"):
        from_dict(typo, "V1alpha1ServingRuntime")
    missing = json.loads(json.dumps(doc))
    del missing["spec"]["containers"]
    with pytest.raises(ValueError, match="containers"):
        from_dict(missing, "V1alpha1ServingRuntime")


def test_serve_command_parses():
    """The runtime's command is one the real CLI accepts, with the model path and port it names."""
    from cellpuzzles.cli.main import build_parser

    args = build_parser().parse_args(SERVE_COMMAND[1:])
    assert args.command == "serve"
    assert str(args.model) == "/mnt/models" and int(args.port) == 8080


# ---------------------------------------------------------------- MLflow

@pytest.mark.slow
def test_mlflow_server_flags_and_stores():
    from mlflow.server.security_utils import is_allowed_host_header

    deployment = _one("Deployment", "mlflow")
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["mlflow"] and c["args"][0] == "server"
    args = c["args"]
    flags = dict(zip(args[1::2], args[2::2]))
    assert flags["--host"] == "0.0.0.0" and flags["--port"] == "5000" and flags["--app-name"] == "basic-auth"
    allowed = flags["--allowed-hosts"].split(",")
    # The URI the training job logs to passes the server's own Host-header check.
    job = _one("PyTorchJob", "cellpuzzles-sft-multinode")
    job_env = {e["name"]: e for e in job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["env"]}
    host = urlsplit(job_env["MLFLOW_TRACKING_URI"]["value"]).netloc
    assert is_allowed_host_header(allowed, host)
    assert is_allowed_host_header(allowed, "mlflow:5000")
    assert not is_allowed_host_header(allowed, "evil.example.com")
    assert job_env["MLFLOW_TRACKING_USERNAME"]["valueFrom"]["secretKeyRef"]["name"] == placement.MLFLOW_SECRET[0]
    service = _one("Service", "mlflow")
    assert host == f"mlflow.{NAMESPACE}.svc.cluster.local:{service['spec']['ports'][0]['port']}"

    env = {e["name"]: e for e in c["env"]}
    backend = urlsplit(env["MLFLOW_BACKEND_STORE_URI"]["value"])
    pg = _one("Service", "mlflow-postgres")
    assert backend.scheme.startswith("postgresql") and backend.hostname == "mlflow-postgres"
    assert backend.port == pg["spec"]["ports"][0]["port"]
    assert "$(POSTGRES_PASSWORD)" in env["MLFLOW_BACKEND_STORE_URI"]["value"]  # from the Secret, not inline
    assert list(env).index("POSTGRES_PASSWORD") < list(env).index("MLFLOW_BACKEND_STORE_URI")  # $(VAR) order
    assert "configMapKeyRef" in env["MLFLOW_ARTIFACTS_DESTINATION"]["valueFrom"]
    for var, key in (("MLFLOW_AUTH_ADMIN_USERNAME", "username"), ("MLFLOW_AUTH_ADMIN_PASSWORD", "password")):
        assert env[var]["valueFrom"]["secretKeyRef"] == {"name": placement.MLFLOW_SECRET[0], "key": key}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] == "/health"

    ini = configparser.ConfigParser()
    ini.read_string(_one("ConfigMap", "mlflow-config")["data"]["basic_auth.ini"])
    auth_db = ini["mlflow"]["database_uri"].removeprefix("sqlite:///")
    mounts = [m["mountPath"] for m in c["volumeMounts"]]
    assert any(auth_db.startswith(m + "/") for m in mounts), "the auth database must sit on the volume"
    assert env["MLFLOW_AUTH_CONFIG_PATH"]["value"].rsplit("/", 1)[0] in mounts


def test_mlflow_image_matches_the_pinned_mlflow():
    pyproject = (ROOT / "pyproject.toml").read_text()
    version = re.search(r'"mlflow==([\d.]+)"', pyproject).group(1)
    assert f"mlflow=={version}" in (INFRA / "docker" / "mlflow.Dockerfile").read_text()
    (c,) = _one("Deployment", "mlflow")["spec"]["template"]["spec"]["containers"]
    assert c["image"].endswith(f":{version}")


# ---------------------------------------------------------------- Terraform

def test_terraform_node_pool_matches_placement():
    pool = _node_pool()
    assert pool["name"] == placement.GPU_NODE_POOL
    # GKE's automatic node label is what the pipeline selects on.
    assert placement.GPU_NODE_SELECTOR == {"cloud.google.com/gke-nodepool": pool["name"]}
    (node,) = pool["node_config"]
    (acc,) = node["guest_accelerator"]
    assert acc["type"] == "nvidia-h100-80gb"
    assert node["machine_type"].startswith("a3-highgpu-")
    assert node["machine_type"] == f"a3-highgpu-{acc['count']}g"
    (taint,) = node["taint"]
    tol = placement.GPU_TOLERATION
    assert (taint["key"], taint["value"], tol["operator"]) == (tol["key"], tol["value"], "Equal")
    assert taint["effect"] == re.sub(r"(?<!^)([A-Z])", r"_\1", tol["effect"]).upper()  # NoSchedule -> NO_SCHEDULE
    assert not any(k.startswith("cloud.google.com/") for k in node.get("labels", {}))  # reserved by GKE
    (auto,) = pool["autoscaling"]
    assert auto["min_node_count"] == 0


def test_terraform_pool_fits_the_multinode_job():
    variables = {name: body for block in _terraform()["variable"] for name, body in block.items()}
    assert {"project_id", "region", "cluster_name"} <= set(variables)
    used = set()
    for tf in TERRAFORM.glob("*.tf"):
        used |= set(re.findall(r"\bvar\.(\w+)", tf.read_text()))
    assert used <= set(variables), f"undeclared variables: {used - set(variables)}"
    pool = _node_pool()
    max_nodes = pool["autoscaling"][0]["max_node_count"]
    assert max_nodes == "${var.max_node_count}"
    job = _one("PyTorchJob", "cellpuzzles-sft-multinode")
    nodes = sum(r["replicas"] for r in job["spec"]["pytorchReplicaSpecs"].values())
    assert variables["max_node_count"]["default"] >= nodes
    gpus_per_node = pool["node_config"][0]["guest_accelerator"][0]["count"]
    assert gpus_per_node == int(job["spec"]["nprocPerNode"])

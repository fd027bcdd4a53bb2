"""The compiled pipeline: committed YAML up to date, GPU placement, caching, secrets, exit handler."""

import yaml

from cellpuzzles.pipelines.retrain import PIPELINE_YAML, compile_pipeline
from cellpuzzles.release.placement import GPU_NODE_SELECTOR, GPU_TOLERATION, MLFLOW_SECRET, TEACHER_SECRET

GPU_STEPS = {"sft", "rl", "evaluate"}
UNCACHED = {"evaluate", "register", "gate", "deploy", "record-status"}


def _docs(path):
    docs = list(yaml.safe_load_all(path.read_text()))
    return docs[0], (docs[1] if len(docs) > 1 else {})


def test_committed_yaml_is_what_the_code_compiles(tmp_path):
    fresh = compile_pipeline(tmp_path / "retrain.yaml")
    assert fresh.read_text() == PIPELINE_YAML.read_text(), \
        "pipelines/retrain.yaml is out of date: run `cellpuzzles pipeline compile` and commit it"


def _tasks(spec):
    tasks = {}

    def walk(dag):
        for name, t in dag.get("tasks", {}).items():
            tasks[name] = t
            comp = spec["components"][t["componentRef"]["name"]]
            if "dag" in comp:
                walk(comp["dag"])
    walk(spec["root"]["dag"])
    return tasks


def test_gpu_steps_declare_accelerator_node_selector_and_toleration():
    spec, platform = _docs(PIPELINE_YAML)
    executors = spec["deploymentSpec"]["executors"]
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for step in ("validate", "puzzles", "distill", "sft", "rl", "evaluate", "register", "gate", "deploy"):
        res = executors[f"exec-{step}"]["container"].get("resources", {})
        if step in GPU_STEPS:
            assert res["accelerator"]["resourceType"] == "nvidia.com/gpu" and res["accelerator"]["resourceCount"] == "1"
            assert k8s[f"exec-{step}"]["nodeSelector"]["labels"] == GPU_NODE_SELECTOR
            assert k8s[f"exec-{step}"]["tolerations"] == [GPU_TOLERATION]
        else:
            assert "accelerator" not in res, step
            assert "nodeSelector" not in k8s.get(f"exec-{step}", {}), step


def test_caching_off_for_evaluate_register_gate_deploy_and_on_upstream():
    spec, _ = _docs(PIPELINE_YAML)
    tasks = _tasks(spec)
    for name in UNCACHED:
        assert tasks[name]["cachingOptions"].get("enableCache") is not True, name
    for name in ("validate", "puzzles", "distill", "sft", "rl"):
        assert tasks[name]["cachingOptions"]["enableCache"] is True, name


def test_secrets_exit_handler_and_gate_condition():
    spec, platform = _docs(PIPELINE_YAML)
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    teacher = [s for s in k8s["exec-distill"]["secretAsEnv"] if s["secretName"] == TEACHER_SECRET[0]]
    assert teacher and {e["envVar"] for e in teacher[0]["keyToEnv"]} == set(TEACHER_SECRET[1].values())
    for ex in ("exec-validate", "exec-sft", "exec-register", "exec-gate", "exec-record-status"):
        assert MLFLOW_SECRET[0] in {s["secretName"] for s in k8s[ex]["secretAsEnv"]}, ex
    root = spec["root"]["dag"]["tasks"]
    assert root["record-status"]["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    tasks = _tasks(spec)
    cond = [t for n, t in tasks.items() if n.startswith("gate-passed") or n.startswith("condition")]
    assert cond and "pass" in cond[0]["triggerPolicy"]["condition"]
    params = spec["root"]["inputDefinitions"]["parameters"]
    for p in ("data_source", "data_version", "base_model", "rl_algo", "sft_options", "min_batch_accuracy",
              "min_format_ratio", "tolerance", "mlflow_uri", "kserve_namespace"):
        assert p in params, p

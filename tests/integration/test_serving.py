"""The inference endpoint, started for real: `cellpuzzles serve` (KServe ModelServer) on a free
port with a small real (untrained) model built from the bundled data, called with KServe's
InferenceRESTClient (V1 and V2), the openai client and plain HTTP; `serve-transformer` in front
of it over its OpenAI route (which stands in for vLLM's); MLflow `models:/NAME@alias`
resolution against a real sqlite-backed MLflow registry."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import urllib.request

import pytest

from helpers.cli import run_cli
from helpers.models import as_scaffold_model, build_world
from helpers.serving import Server, instance, metric, post, status

pytestmark = pytest.mark.slow  # every test needs the model world and/or a server subprocess (seconds each)

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_CELLS = 6
MAX_BODY = 20_000


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Bundled data -> puzzles -> markers traces -> an untrained tiny model (8 genes per cell)."""
    w = build_world(tmp_path_factory.mktemp("serving"), genes_per_cell=8, train_per_n=20, test_per_n=8)
    return {"root": w["root"], "folder": w["folder"], "test": w["splits"]["test"]}


@pytest.fixture(scope="module")
def server(world):
    s = Server(["serve", "--model", str(world["folder"]), "--max-batch-size", "8", "--max-wait-ms", "30",
                "--max-cells", str(MAX_CELLS), "--max-body-bytes", str(MAX_BODY)], world["root"] / "serve.log",
               env={"CELLPUZZLES_API_TOKEN": TOKEN, "CELLPUZZLES_SERVE_LOAD_DELAY_S": "3"})
    seen = {"v2_ready": set(), "v1_status": set(), "live": set()}
    deadline = time.time() + 120
    while time.time() < deadline:  # watch readiness while the model loads
        seen["v2_ready"].add(status(s.url + "/v2/models/cellpuzzles/ready"))
        seen["v1_status"].add(status(s.url + "/v1/models/cellpuzzles"))
        seen["live"].add(status(s.url + "/"))
        if 200 in seen["v2_ready"] or s.proc.poll() is not None:
            break
        time.sleep(0.1)
    s.wait()
    s.readiness_seen = seen
    yield s
    s.stop()


def v1(server, instances, **extra):
    return post(server.url + "/v1/models/cellpuzzles:predict", {"instances": instances, **extra}, AUTH)


def assert_valid_assignment(pred, inst):
    ids = [c["id"] for c in inst["cells"]]
    assert pred["valid"] is True and pred["reason"] is None
    assert list(pred["assignments"]) == ids
    assert sorted(pred["assignments"].values()) == sorted(inst["candidates"])  # one-to-one
    assert pred["answer"] == [pred["assignments"][i] for i in ids]


def test_readiness_is_false_until_the_model_is_loaded(server):
    seen = server.readiness_seen
    assert 503 in seen["v2_ready"] and 200 in seen["v2_ready"]  # not ready first, then ready
    assert 503 in seen["v1_status"]
    assert 200 in seen["live"]  # the server is alive while it loads
    assert status(server.url + "/v1/models/cellpuzzles") == 200


def test_v1_constrained_is_always_a_valid_permutation(server, world):
    from kserve import InferenceRESTClient, RESTConfig

    puzzles = world["test"][:6]
    instances = [instance(p) for p in puzzles]
    client = InferenceRESTClient(RESTConfig(protocol="v1"))
    res = asyncio.run(client.infer(server.url, {"instances": instances}, model_name="cellpuzzles", headers=AUTH))
    assert len(res["predictions"]) == len(instances)
    for pred, inst in zip(res["predictions"], instances):
        assert pred["mode"] == "constrained"
        assert_valid_assignment(pred, inst)
        assert isinstance(pred["completion"], str) and isinstance(pred["reasoning"], str)


def test_raw_expression_becomes_top_genes(server, world):
    p = world["test"][0]
    inst = instance(p)
    # the same ranking as values: rank r gets value 100 - r; an extra low gene ties and sorts by name
    inst["cells"] = [{"id": c["id"], "expression": {g: 100.0 - r for r, g in enumerate(c["genes"])} | {"ZZZ": -1.0}}
                     for c in inst["cells"]]
    code, body = v1(server, [inst])
    assert code == 200, body
    assert_valid_assignment(body["predictions"][0], inst)


def test_free_mode_flags_invalid_answers_and_mode_is_per_instance(server, world):
    p, q = world["test"][0], world["test"][-1]
    code, body = v1(server, [instance(p), instance(q, mode="constrained")], mode="free")
    assert code == 200, body
    free, cons = body["predictions"]
    assert free["mode"] == "free" and cons["mode"] == "constrained"
    # the untrained model's text is not a valid answer: flagged with a reason, never fixed
    assert free["valid"] is False and free["assignments"] is None and free["reason"]
    assert_valid_assignment(cons, instance(q))


def test_v2_protocol_with_kserve_client(server, world):
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

    instances = [instance(p) for p in world["test"][:2]]
    req = InferRequest(model_name="cellpuzzles", parameters={"mode": "constrained"}, infer_inputs=[
        InferInput(name="instances", shape=[2], datatype="BYTES", data=[json.dumps(x) for x in instances])])
    client = InferenceRESTClient(RESTConfig(protocol="v2"))
    res = asyncio.run(client.infer(server.url, req, model_name="cellpuzzles", headers=AUTH))
    out = res.outputs[0]
    assert out.name == "predictions" and out.datatype == "BYTES"
    preds = [json.loads(x) for x in out.data]
    for pred, inst in zip(preds, instances):
        assert_valid_assignment(pred, inst)


def test_openai_chat_route_with_openai_client(server, world):
    import openai

    p = world["test"][1]
    client = openai.OpenAI(base_url=server.url + "/openai/v1", api_key=TOKEN)
    r = client.chat.completions.create(model="cellpuzzles", messages=p.messages())
    text = r.choices[0].message.content
    assert r.object == "chat.completion" and r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 0
    # the same prompt through V1 free mode gives the same greedy text (one definition of the prompt)
    code, body = v1(server, [instance(p)], mode="free")
    assert code == 200 and body["predictions"][0]["completion"] == text
    with pytest.raises(openai.BadRequestError, match="not a CellPuzzles prompt"):
        client.chat.completions.create(model="cellpuzzles", messages=[{"role": "user", "content": "hello"}])
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=p.messages())
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/openai/v1", api_key="wrong").chat.completions.create(
            model="cellpuzzles", messages=p.messages())


def _mutations(p):
    def m(f):
        x = instance(p)
        f(x)
        return x
    big = instance(p)
    while len(big["cells"]) <= MAX_CELLS:
        k = len(big["cells"])
        big["cells"].append({"id": f"extra{k}", "genes": ["CD3D"]})
        big["candidates"].append(f"type {k}")
    return [
        (m(lambda x: x.pop("cells")), r"instances\[0\]\.cells: missing"),
        (m(lambda x: x.pop("context")), r"instances\[0\]\.context: missing"),
        (m(lambda x: x["candidates"].pop()), r"instances\[0\]\.candidates: \d+ candidates for \d+ cells"),
        (m(lambda x: x["candidates"].__setitem__(1, x["candidates"][0].upper())), r"candidates\[1\]: duplicate"),
        (big, rf"instances\[0\]\.cells: {MAX_CELLS + 1} cells is above the limit of {MAX_CELLS}"),
        (m(lambda x: x["cells"][1]["genes"].__setitem__(0, 7)), r"instances\[0\]\.cells\[1\]\.genes\[0\]"),
        (m(lambda x: x["cells"][0].__setitem__("expression", {"CD3D": 1})), r"cells\[0\]: give exactly one"),
        (m(lambda x: x.__setitem__("mode", "greedy")), r"instances\[0\]\.mode"),
        (m(lambda x: x["context"].__setitem__("age", "40") if isinstance(x["context"], dict) else None),
         r"context\.age: unknown field"),
    ]


def test_bad_requests_get_400_naming_the_field(server, world):
    for bad, pattern in _mutations(world["test"][0]):
        code, body = v1(server, [bad])
        assert code == 400, (pattern, body)
        assert re.search(pattern, body["error"]), (pattern, body["error"])
    code, body = post(server.url + "/v1/models/cellpuzzles:predict", {"inputs": []}, AUTH)
    assert code == 400 and "instances" in body["error"]


def test_body_over_the_limit_is_refused(server, world):
    inst = instance(world["test"][0])
    inst["cells"][0]["genes"] = [f"G{i}" for i in range(MAX_BODY // 4)]
    code, body = v1(server, [inst])
    assert code == 413 and "--max-body-bytes" in body["error"]
    # without a content-length (chunked upload) the limit holds too
    data = json.dumps({"instances": [inst]}).encode()
    req = urllib.request.Request(server.url + "/v1/models/cellpuzzles:predict", data=iter([data[:5000], data[5000:]]),
                                 method="POST", headers={"content-type": "application/json",
                                                         "transfer-encoding": "chunked", **AUTH})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 413


def test_bearer_token_is_required_but_health_and_metrics_stay_open(server, world):
    body = {"instances": [instance(world["test"][0])]}
    assert post(server.url + "/v1/models/cellpuzzles:predict", body)[0] == 401
    assert post(server.url + "/v1/models/cellpuzzles:predict", body, {"Authorization": "Bearer nope"})[0] == 401
    code, err = post(server.url + "/v2/models/cellpuzzles/infer", {"inputs": []})
    assert code == 401 and "Bearer" in err["error"]
    for path in ("/", "/v2/health/live", "/v2/health/ready", "/v2/models/cellpuzzles/ready", "/v1/models/cellpuzzles",
                 "/metrics"):
        assert status(server.url + path) == 200, path


def test_concurrent_requests_are_decoded_in_batches(server, world):
    before = metric(server.url, "cellpuzzles_batch_size_sum"), metric(server.url, "cellpuzzles_batch_size_count")
    puzzles = world["test"][:8]
    codes = []

    def one(p):
        code, body = v1(server, [instance(p)])
        codes.append(code if code == 200 else (code, body))

    threads = [threading.Thread(target=one, args=(p,)) for p in puzzles]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes == [200] * 8
    n_instances = metric(server.url, "cellpuzzles_batch_size_sum") - before[0]
    n_batches = metric(server.url, "cellpuzzles_batch_size_count") - before[1]
    assert n_instances == 8
    assert n_batches < 8  # some instances shared a decode


def test_metrics_count_requests_by_route_and_status(server, world):
    v1(server, [instance(world["test"][0])])
    post(server.url + "/v1/models/cellpuzzles:predict", {"instances": [{}]}, AUTH)
    post(server.url + "/v1/models/cellpuzzles:predict", {"instances": [{}]}, {})  # no token: 401
    url = server.url
    assert metric(url, "cellpuzzles_requests_total", route="v1_predict", status="200") >= 1
    assert metric(url, "cellpuzzles_requests_total", route="v1_predict", status="400") >= 1
    assert metric(url, "cellpuzzles_requests_total", route="v1_predict", status="401") >= 1
    assert metric(url, "cellpuzzles_request_seconds_count", route="v1_predict") >= 3
    assert metric(url, "cellpuzzles_instances_total", mode="constrained", valid="true") >= 1
    assert metric(url, "request_predict_seconds_count", model_name="cellpuzzles") >= 1  # KServe's own


def test_transformer_in_front_of_an_openai_predictor(server, world):
    t = Server(["serve-transformer", "--predictor-url", server.url, "--model-dir", str(world["folder"]),
                "--constrained-by", "repair"],
               world["root"] / "transformer.log", env={"CELLPUZZLES_PREDICTOR_TOKEN": TOKEN,
                                                       "CELLPUZZLES_API_TOKEN": ""})
    try:
        t.wait()
        p, q = world["test"][2], world["test"][-2]
        code, body = post(t.url + "/v1/models/cellpuzzles:predict",
                          {"instances": [instance(p), instance(q, mode="free")]})
        assert code == 200, body
        cons, free = body["predictions"]
        assert cons["mode"] == "constrained" and sorted(cons["assignments"].values()) == sorted(p.candidates)
        assert cons["valid"] is True and cons["repaired"] is True and cons["reason"].startswith("repaired: ")
        assert free["mode"] == "free" and free["valid"] is False and free["assignments"] is None
        # the completion came from the predictor's OpenAI route: the same greedy text it gives directly
        code, direct = v1(server, [instance(q)], mode="free")
        assert free["completion"] == direct["predictions"][0]["completion"]
        code, err = post(t.url + "/v1/models/cellpuzzles:predict", {"instances": [{"cells": []}]})
        assert code == 400 and "instances[0]" in err["error"]
    finally:
        t.stop()


def test_models_uri_resolves_through_a_real_mlflow_registry(world, tmp_path, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    from cellpuzzles.core.errors import CellPuzzlesError
    from cellpuzzles.serving.server import resolve_model

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")  # process-wide: conftest.py puts it back after the test
    client = MlflowClient()
    client.create_registered_model("cellpuzzles-test")
    v = client.create_model_version("cellpuzzles-test", source=str(world["folder"]))
    client.set_registered_model_alias("cellpuzzles-test", "champion", v.version)
    path = resolve_model("models:/cellpuzzles-test@champion", dest=tmp_path / "dl")
    assert (path / "config.json").read_bytes() == (world["folder"] / "config.json").read_bytes()
    assert (path / "model.safetensors").read_bytes() == (world["folder"] / "model.safetensors").read_bytes()
    with pytest.raises(CellPuzzlesError, match="models:/cellpuzzles-test@nope: cannot download from MLflow"):
        resolve_model("models:/cellpuzzles-test@nope", dest=tmp_path / "dl2")


def test_serve_cli_errors_are_one_line(tmp_path):
    r = run_cli("serve", "--model", str(tmp_path / "missing"))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert "not a folder" in r.stderr
    r = run_cli("serve", "--model", str(tmp_path), "--workers", "2")
    assert r.returncode == 2 and "--workers 2" in r.stderr
    r = run_cli("serve-transformer", "--predictor-url", "localhost:9")
    assert r.returncode == 2 and "--predictor-url" in r.stderr


@pytest.mark.slow
def test_a_model_that_fails_to_load_stops_the_server_with_one_line(world, tmp_path):
    """Weights that do not load: the server stops by itself (no os._exit), exit code 2, and the
    last line of stderr names the folder and the reason."""
    import shutil

    from helpers.net import free_port

    broken = tmp_path / "broken"
    shutil.copytree(world["folder"], broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    r = run_cli("serve", "--model", broken, "--port", free_port(), timeout=180)
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: --model {broken}") and "Traceback" not in r.stderr
    assert last.count("--model") == 1  # said once, not "--model X: --model X: ..."


def test_scaffold_model_answers_constrained_requests_from_its_type_slots(world, tmp_path):
    """A model trained on scaffold traces (restated_genes in its folder): constrained answers
    come from the scaffold's type slots, so the reasoning restates each cell's genes and
    names the assigned type; free-mode instances in the same request still get free text."""
    from cellpuzzles.inference.folder import PromptOptions
    from cellpuzzles.task.scaffold import think_lines

    folder = as_scaffold_model(world["folder"], tmp_path / "scaffold-model", genes_per_cell=8, restated_genes=6)
    s = Server(["serve", "--model", str(folder)], tmp_path / "serve-scaffold.log")
    try:
        s.wait()
        puzzles = world["test"][:3]
        instances = [instance(p) for p in puzzles] + [instance(puzzles[0], mode="free")]
        code, body = post(s.url + "/v1/models/cellpuzzles:predict", {"instances": instances})
        assert code == 200, body
        preds = body["predictions"]
        for pred, inst, p in zip(preds, instances, puzzles):
            assert_valid_assignment(pred, inst)
            shown = PromptOptions(genes_per_cell=8).apply(p)
            assert pred["reasoning"] == think_lines(shown, 6, pred["answer"])
        assert preds[3]["mode"] == "free" and not preds[3]["completion"].startswith("<think>Cell 1: ")
    finally:
        s.stop()

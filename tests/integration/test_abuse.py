"""`cellpuzzles serve` under abuse, against the real server (KServe ModelServer in a subprocess,
traffic on 127.0.0.1): bounded cost per request (limits with 4xx naming the limit), fairness
(a small request is not held behind a large one), cancellation (a client that leaves, a
request past its deadline: the rest of its work is dropped), input hygiene (no 5xx from any
input, on every route), slow clients (raw sockets that stall), readiness that means loaded,
and metrics/logs that tell disconnects and client errors from server errors.

Three servers start in parallel: the tiny model with small limits (most cases), the
production-shaped model (tests/helpers/production.py: byte-level BPE, Qwen's template, names
of several tokens) where the answer depends on the model (tokens per prompt, candidate
names, the OpenAI token budget), and the tiny model (scaffold-marked: constrained answers are
cheap, free text is not) decoding one instance per batch with a 5 s deadline
(fairness, cancellation, deadline). Bounded: about 40 requests, under a minute.
"""

from __future__ import annotations

import json
import re
import time

import pytest

from helpers.models import as_scaffold_model, build_world
from helpers.production import build_production_model
from helpers.serving import RawClient, Server, instance, metric, post, status

pytestmark = pytest.mark.slow

V1 = "/v1/models/cellpuzzles:predict"
V2 = "/v2/models/cellpuzzles/infer"
CHAT = "/openai/v1/chat/completions"
LIMITS = {"instances": 4, "cells": 6, "genes": 60, "prompt_tokens": 600, "body": 30_000, "header": 8192}
DEADLINE_S = 5


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("abuse")
    w = build_world(root, genes_per_cell=8, train_per_n=20, test_per_n=8)
    prod = build_production_model([p for p, _ in w["pairs"]], [t for _, t in w["pairs"]], root / "prod",
                                  genes_per_cell=8)
    # the same tiny model marked as scaffold-trained: a constrained answer is only slot scoring,
    # so small constrained requests cost far less than large free-text ones
    scaffold = as_scaffold_model(w["folder"], root / "scaffold", genes_per_cell=8, restated_genes=6)
    return {"root": root, "tiny": w["folder"], "prod": prod, "scaffold": scaffold, "test": w["splits"]["test"]}


@pytest.fixture(scope="module")
def servers(world):
    root, lim = world["root"], LIMITS
    limits = ["--max-instances", lim["instances"], "--max-cells", lim["cells"], "--max-genes", lim["genes"],
              "--max-prompt-tokens", lim["prompt_tokens"], "--max-body-bytes", lim["body"],
              "--max-header-bytes", lim["header"], "--header-timeout-s", 1, "--body-timeout-s", 1]
    limits = [str(x) for x in limits]
    s = {
        "tiny": Server(["serve", "--model", str(world["tiny"]), *limits], root / "tiny.log",
                       env={"CELLPUZZLES_SERVE_LOAD_DELAY_S": "2"}),
        "prod": Server(["serve", "--model", str(world["prod"]), *limits], root / "prod.log"),
        "small_batches": Server(["serve", "--model", str(world["scaffold"]), "--max-batch-size", "1", "--max-wait-ms", "0",
                                 "--max-instances", "64", "--request-timeout-s", str(DEADLINE_S)],
                                root / "small_batches.log"),
    }
    seen = {"health": set(), "model": set(), "live": set()}
    t = s["tiny"]
    deadline = time.time() + 120
    while time.time() < deadline and 200 not in seen["model"] and t.proc.poll() is None:
        seen["health"].add(status(t.url + "/v2/health/ready"))
        seen["model"].add(status(t.url + "/v2/models/cellpuzzles/ready"))
        seen["live"].add(status(t.url + "/v2/health/live"))
        time.sleep(0.1)
    t.readiness_seen = seen
    try:
        for x in s.values():
            x.wait()
        yield s
    finally:
        for x in s.values():
            x.proc.terminate()
        for x in s.values():
            x.stop()


@pytest.fixture(params=["tiny", "prod"])
def server(request, servers):
    return servers[request.param]


def prompt_tokens(folder, inst: dict) -> int:
    """Tokens of an instance's prompt counted with the model's own tokenizer (as the server must)."""
    from cellpuzzles.inference.folder import load_prompt_options, load_tokenizer
    from cellpuzzles.inference.prompting import prompt_text
    from cellpuzzles.task.puzzle import Puzzle

    tok, opt = load_tokenizer(folder), load_prompt_options(folder)
    cands = sorted(inst["candidates"])
    p = Puzzle(genes=[c["genes"] for c in inst["cells"]], candidates=cands, answer=cands, context=inst["context"].strip())
    return len(tok(prompt_text(tok, opt.apply(p)), add_special_tokens=False)["input_ids"])


def chat_body(p, **extra) -> dict:
    return {"model": "cellpuzzles", "messages": p.messages(), **extra}


def v2_body(instances: list) -> dict:
    return {"inputs": [{"name": "instances", "shape": [len(instances)], "datatype": "BYTES",
                        "data": [x if isinstance(x, str) else json.dumps(x) for x in instances]}]}


def error_text(body: dict) -> str:
    e = body.get("error")
    return e["message"] if isinstance(e, dict) else str(e)


# ---------------------------------------------------------------- readiness

def test_readiness_is_false_until_the_model_is_loaded(servers):
    seen = servers["tiny"].readiness_seen
    assert 503 in seen["health"] and 503 in seen["model"], seen  # KServe's own /v2/health/ready said 200 here
    assert seen["live"] - {None} == {200}  # alive while loading (None: the port was not open yet)
    assert status(servers["tiny"].url + "/v2/health/ready") == 200


# ---------------------------------------------------------------- limits

def test_limits_answer_4xx_naming_the_limit_and_the_value(server, world):
    url, p = server.url, world["test"][0]
    code, body = post(url + V1, {"instances": [instance(p)] * (LIMITS["instances"] + 1)})
    assert code == 400 and f"{LIMITS['instances'] + 1} instances is above the limit of {LIMITS['instances']}" in \
        body["error"] and "--max-instances" in body["error"]
    code, body = post(url + V2, v2_body([instance(p)] * (LIMITS["instances"] + 1)))
    assert code == 400 and "inputs.instances" in body["error"] and "--max-instances" in body["error"]
    for field in ("genes", "expression"):
        x = instance(p)
        many = [f"G{i}" for i in range(LIMITS["genes"] + 1)]
        x["cells"][1] = {"id": "c1", field: many if field == "genes" else {g: 1.0 for g in many}}
        code, body = post(url + V1, {"instances": [x]})
        assert code == 400 and re.search(rf"instances\[0\]\.cells\[1\]\.{field}: {LIMITS['genes'] + 1} genes is above "
                                         rf"the limit of {LIMITS['genes']} \(--max-genes\)", body["error"]), body
    code, body = post(url + V1, {"instances": [dict(instance(p), context="word " * 7000)]})
    assert code == 413 and "--max-body-bytes" in body["error"]


def test_tokens_per_prompt_are_counted_with_the_models_tokenizer(server, world, request):
    folder = world[request.node.callspec.params["server"]]
    x = instance(world["test"][1])
    x["context"] = "The donor was sampled in a long study of immune cells across many tissues. " * 12
    n = prompt_tokens(folder, x)
    assert n > LIMITS["prompt_tokens"]
    code, body = post(server.url + V1, {"instances": [instance(world["test"][0]), x]})
    assert code == 400, body
    assert f"instances[1]: its prompt is {n} tokens, above the limit of {LIMITS['prompt_tokens']}" in body["error"]
    p = world["test"][1]
    code, body = post(server.url + CHAT, chat_body(p, messages=[
        {"role": "user", "content": p.user_msg.replace(p.context, x["context"].strip())}]))
    assert code == 400 and "--max-prompt-tokens" in error_text(body) and body["error"]["param"] == "messages"


# ---------------------------------------------------------------- input hygiene

@pytest.mark.parametrize("bad", ["CD19+ B | x", "B|T", "two\nlines", "CR\rname", "<answer>B", "B</think>", "<think>",
                                 "x </answer>"])
def test_candidates_the_answer_format_cannot_carry_are_400_naming_them(servers, world, bad):
    """The answer separator, line breaks and the format's tags in a candidate (they used to give
    200 with assignments null) -> 400 naming candidates[j], on V1, V2 and the OpenAI route."""
    url, p = servers["tiny"].url, world["test"][0]
    x = instance(p)
    x["candidates"][1] = bad
    code, body = post(url + V1, {"instances": [instance(p), x]})
    assert code == 400 and body["error"].startswith("instances[1].candidates[1]: contains"), body
    code, body = post(url + V2, v2_body([x]))
    assert code == 400 and "inputs.instances[0].candidates[1]: contains" in body["error"], body
    if "\n" not in bad and "\r" not in bad:  # a line break splits the chat prompt's candidate line itself
        msg = p.user_msg.replace("\n" + p.candidates[1], "\n" + bad)
        code, body = post(url + CHAT, chat_body(p, messages=[{"role": "user", "content": msg}]))
        assert code == 400 and "candidates[" in error_text(body) and "contains" in error_text(body), body


UNDECODABLE = {
    "deep JSON as text/plain": (b"[" * 5000 + b"]" * 5000, {"content-type": "text/plain"}, "depth"),
    "deep JSON within the parser's depth": (b'{"instances": ' + b"[" * 60 + b"]" * 60 + b"}", {}, "nested deeper"),
    "lone surrogate escape": (b'{"instances": [{"context": "\\ud800", "cells": [], "candidates": []}]}', {},
                              "surrogate"),
    "invalid UTF-8": (b'{"instances": ["\xff\xfe"]}', {}, "UTF-8"),
    "not JSON": (b"instances=1", {"content-type": "application/x-www-form-urlencoded"}, "not valid JSON"),
}


@pytest.mark.parametrize("case", list(UNDECODABLE))
def test_json_the_server_cannot_decode_is_400_on_every_route(servers, case):
    data, headers, why = UNDECODABLE[case]
    for path in (V1, V2, CHAT):
        code, body = post(servers["tiny"].url + path, data, headers)
        assert code == 400 and why in error_text(body), (path, body)


def test_v2_elements_and_binary_header_are_checked(servers, world):
    url = servers["tiny"].url
    code, body = post(url + V2, v2_body(['{"context": "\\ud800"}']))  # an escape inside an element's JSON text
    assert code == 400 and "inputs.instances[0]: not a JSON object string" in body["error"], body
    for value in ("abc", "-1", "99999"):
        code, body = post(url + V2, v2_body([instance(world["test"][0])]), {"inference-header-content-length": value})
        assert code == 400 and body["error"].startswith("inference-header-content-length:"), (value, body)


def test_unknown_candidate_names_are_flagged(server, world, request):
    p = world["test"][0]
    known = instance(p)
    changed = instance(p)
    changed["candidates"][0] = changed["candidates"][0].lower()
    code, body = post(server.url + V1, {"instances": [known, changed]})
    assert code == 200, body
    a, b = body["predictions"]
    assert a["valid"] and b["valid"]
    if request.node.callspec.params["server"] == "tiny":  # a vocabulary built from the training puzzles
        assert a["unknown_candidates"] == [] and "warning" not in a
        assert b["unknown_candidates"] == [changed["candidates"][0]] and "cannot score" in b["warning"]
    else:  # byte-level BPE writes any name: the server says it cannot tell, never claims "all known"
        assert a["unknown_candidates"] is None and b["unknown_candidates"] is None


# ---------------------------------------------------------------- the OpenAI route's budget and temperature

def test_openai_route_honours_max_tokens_and_temperature(server, world):
    p = world["test"][2]
    code, greedy = post(server.url + CHAT, chat_body(p))
    assert code == 200, greedy
    for k in (1, 5):
        code, short = post(server.url + CHAT, chat_body(p, max_tokens=k))
        assert code == 200, short
        assert short["choices"][0]["finish_reason"] == "length" and short["usage"]["completion_tokens"] <= k
        assert greedy["choices"][0]["message"]["content"].startswith(short["choices"][0]["message"]["content"])
    code, hot = post(server.url + CHAT, chat_body(p, temperature=1.5, max_tokens=40))
    assert code == 200 and hot["choices"][0]["message"]["content"] != \
        post(server.url + CHAT, chat_body(p, temperature=0, max_tokens=40))[1]["choices"][0]["message"]["content"]
    for field, value in (("max_tokens", 0), ("max_tokens", "9"), ("temperature", 3), ("temperature", "hot")):
        code, body = post(server.url + CHAT, chat_body(p, **{field: value}))
        assert code == 400 and body["error"]["param"] == field, (field, value, body)


# ---------------------------------------------------------------- slow clients

def test_slow_clients_are_cut_off(servers):
    t = servers["tiny"]
    port = t.port
    c = RawClient(port).send(b"POST /v1/models/cellpuzzles:predict HTTP/1.1\r\nhost: x\r\n")  # headers never end
    t0 = time.time()
    code, body, closed = c.response()
    assert code == 408 and closed and b"--header-timeout-s" in body and time.time() - t0 < 10
    c = RawClient(port).post_head(V1, 500).send(b'{"instances": [')  # body never ends
    code, body, closed = c.response()
    assert code == 408 and closed and b"--body-timeout-s" in body
    c = RawClient(port).send(b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\nx-pad: " + b"a" * (LIMITS["header"] + 10)
                             + b"\r\n\r\n")  # a complete head above the limit
    code, body, closed = c.response()
    assert code == 431 and b"--max-header-bytes" in body
    c = RawClient(port).send(b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\nx-pad: " + b"a" * 3 * LIMITS["header"])
    code, _, closed = c.response()  # a head that keeps growing: cut at the limit
    assert code == 400 and closed
    assert status(t.url + "/v2/health/live") == 200  # and the server still serves others


# ---------------------------------------------------------------- fairness, cancellation, deadline

def _free_instances(world, k: int) -> list:
    return [instance(world["test"][-1 - (i % 8)], mode="free") for i in range(k)]


def test_a_small_request_is_not_held_behind_a_large_one_and_a_client_that_leaves_drops_its_work(servers, world):
    s = servers["small_batches"]
    big = json.dumps({"instances": _free_instances(world, 32)}).encode()
    before = metric(s.url, "cellpuzzles_batch_size_sum")
    client = RawClient(s.port).post_head(V1, len(big)).send(big)
    time.sleep(0.3)
    code, body = post(s.url + V1, {"instances": [instance(world["test"][0])]})
    assert code == 200 and body["predictions"][0]["valid"]
    client.sock.settimeout(0.01)
    with pytest.raises(TimeoutError):  # the large request is still being decoded: the small one went between
        client.sock.recv(1)
    client.close()  # the client leaves: the rest of its 32 instances is dropped
    time.sleep(1.5)
    decoded = metric(s.url, "cellpuzzles_batch_size_sum") - before
    assert decoded < 32 - 8, decoded
    assert metric(s.url, "cellpuzzles_requests_total", route="v1_predict", status="disconnected") == 1
    log = s.log.read_text()
    assert "the client disconnected; its remaining work was dropped" in log


def test_a_request_past_its_deadline_is_504_and_its_work_is_dropped(servers, world):
    s = servers["small_batches"]
    before = metric(s.url, "cellpuzzles_batch_size_sum")
    t0 = time.time()
    code, body = post(s.url + V1, {"instances": _free_instances(world, 64)})
    took = time.time() - t0
    assert code == 504 and "--request-timeout-s" in body["error"], body
    assert DEADLINE_S <= took < DEADLINE_S + 10
    time.sleep(1)
    assert metric(s.url, "cellpuzzles_batch_size_sum") - before < 64
    code, _ = post(s.url + V1, {"instances": [instance(world["test"][0])]})
    assert code == 200  # the server goes on


# ---------------------------------------------------------------- metrics and logs (last: after every case above)

def test_zz_no_input_gave_a_5xx_and_client_errors_log_one_line(servers, world):
    """Last in the file: whatever ran before on these servers, no request got a 5xx other than
    the deadline's 504; a client error and a not-ready poll each logged one INFO line."""
    x = instance(world["test"][0])
    x["candidates"][1] = "B | T"
    assert post(servers["tiny"].url + V1, {"instances": [instance(world["test"][0]), x]})[0] == 400
    for name, s in servers.items():
        for route in ("v1_predict", "v2_infer", "openai_completions"):
            for code in ("500", "502", "503"):
                assert metric(s.url, "cellpuzzles_requests_total", route=route, status=code) == 0, (name, route, code)
    log = servers["tiny"].log.read_text()
    assert "Traceback" not in log and " ERROR " not in log
    assert re.search(r"INFO .*400 instances\[1\]\.candidates\[1\]: contains", log)
    assert re.search(r"INFO .*GET /v2/models/cellpuzzles/ready: 503", log)  # a not-ready poll while loading

"""The inference endpoint: a ``kserve.Model`` served by KServe's ModelServer.

Routes (model name ``cellpuzzles``): V1 ``/v1/models/cellpuzzles:predict``, V2
``/v2/models/cellpuzzles/infer`` (KServe does the protocol work), and an OpenAI-compatible
``/openai/v1/chat/completions`` added to the FastAPI app KServe's ModelServer serves
(``kserve.model_server.app``; KServe's own OpenAI routes need vLLM). Request and response
shapes: :mod:`cellpuzzles.serving_schema`. Instances arriving together are decoded in one
batch (:mod:`cellpuzzles.serving_batch`). The model loads in the background: readiness
(V1 model status, V2 model ready) answers 503 until it is loaded.

Modes: ``constrained`` (default) always gives a valid one-to-one assignment
(decode.constrained: per-slot log-likelihoods + Hungarian); ``free`` parses the model's text
and flags an invalid answer (``valid: false`` and a reason), never fixing it.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .errors import CellPuzzlesError
from .serving_batch import MicroBatcher
from .serving_schema import MODES, Instance, Limits, RequestError, parse_instance, parse_instances, prediction

# kserve.model_server parses the process's argv at import time (its own flags, with prefix
# matching: our --mode would read as its --model_name); let it see none of ours.
_argv, sys.argv = sys.argv, sys.argv[:1]
try:
    import kserve
    from fastapi import Request  # module level: FastAPI resolves route annotations from module globals
    from kserve.errors import InferenceError as InferenceRequestError  # noqa: F401  (for serving_transformer: kserve must be imported here, with argv hidden)
    from kserve.errors import InvalidInput, ModelNotReady
    from kserve.model_server import app as kserve_app
    from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse
finally:
    sys.argv = _argv

MODEL_NAME = "cellpuzzles"
TOKEN_ENV = "CELLPUZZLES_API_TOKEN"
LOAD_DELAY_ENV = "CELLPUZZLES_SERVE_LOAD_DELAY_S"  # tests: hold the load to observe not-ready
log = logging.getLogger("cellpuzzles.serving")


@dataclass
class ServeOptions:
    model: str
    port: int = 8080
    mode: str = "constrained"
    max_batch_size: int = 16
    max_wait_ms: float = 10.0
    max_cells: int = 30
    max_body_bytes: int = 1_000_000
    workers: int = 1

    def check(self) -> None:
        if self.mode not in MODES:
            raise CellPuzzlesError(f"--mode {self.mode}: use one of {', '.join(MODES)}")
        if self.workers != 1:
            raise CellPuzzlesError(f"--workers {self.workers}: only 1 is supported (the model and its batcher live in "
                                   "one process); scale with replicas")
        for flag, v in (("--max-batch-size", self.max_batch_size), ("--max-cells", self.max_cells),
                        ("--max-body-bytes", self.max_body_bytes), ("--port", self.port)):
            if v < 1:
                raise CellPuzzlesError(f"{flag} {v}: must be at least 1")
        if self.max_wait_ms < 0:
            raise CellPuzzlesError(f"--max-wait-ms {self.max_wait_ms}: must be 0 or more")


# ---------------------------------------------------------------- model resolution


def resolve_model(uri: str, dest: str | os.PathLike | None = None) -> Path:
    """A local model folder for ``models:/NAME@ALIAS`` (downloaded with MLflow from
    MLFLOW_TRACKING_URI), ``models:/NAME/VERSION``, or a folder used as is."""
    from .train.model import check_folder

    if uri.startswith("models:/"):
        import mlflow

        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest) if dest else None)
        except Exception as e:  # noqa: BLE001 - MLflow raises many types; the user needs one line
            msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            raise CellPuzzlesError(f"--model {uri}: cannot download from MLflow at "
                                   f"{mlflow.get_tracking_uri()} ({msg}); check MLFLOW_TRACKING_URI and the "
                                   "model name/alias") from None
        path = Path(local)
        # a version whose source is a folder holding the model folder: step into it
        if not (path / "config.json").is_file():
            subs = [p for p in path.iterdir() if (p / "config.json").is_file()] if path.is_dir() else []
            if len(subs) == 1:
                path = subs[0]
        return check_folder(path)
    return check_folder(uri)


# ---------------------------------------------------------------- metrics, auth, body limit


class _Metrics:
    def __init__(self):
        from prometheus_client import Counter, Histogram

        self.requests = Counter("cellpuzzles_requests_total", "HTTP requests by route and status", ["route", "status"])
        self.latency = Histogram("cellpuzzles_request_seconds", "HTTP request latency by route", ["route"],
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        self.batch = Histogram("cellpuzzles_batch_size", "instances per batched decode",
                               buckets=(1, 2, 4, 8, 16, 32, 64))
        self.batch_seconds = Histogram("cellpuzzles_batch_seconds", "seconds per batched decode")
        self.instances = Counter("cellpuzzles_instances_total", "answered instances by mode and validity",
                                 ["mode", "valid"])

    def on_batch(self, size: int, seconds: float) -> None:
        self.batch.observe(size)
        self.batch_seconds.observe(seconds)


_METRICS: _Metrics | None = None


def metrics() -> _Metrics:
    global _METRICS
    if _METRICS is None:
        _METRICS = _Metrics()
    return _METRICS


def route_label(path: str) -> str:
    if path.endswith(":predict"):
        return "v1_predict"
    if path.startswith("/v2/models/") and path.endswith("/infer"):
        return "v2_infer"
    if path.startswith("/openai/"):
        return "openai_" + path.rstrip("/").rsplit("/", 1)[-1].replace(".", "_")
    if path in ("/metrics",):
        return "metrics"
    if path.startswith(("/v1/models", "/v2/models", "/v2/health", "/v2")) or path == "/":
        return "health"
    return "other"


class Gate:
    """ASGI middleware: bearer-token auth (when CELLPUZZLES_API_TOKEN is set; GET health,
    readiness and metrics stay open), a request body limit (413), and request metrics."""

    def __init__(self, app, max_body_bytes: int, token: str | None):
        self.app = app
        self.max_body = max_body_bytes
        self.token = token or None
        self.m = metrics()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = route_label(scope["path"])
        t0 = time.perf_counter()
        status = {"code": 500}

        async def send_wrapped(msg):
            if msg["type"] == "http.response.start":
                status["code"] = msg["status"]
            await send(msg)

        try:
            refusal = await self._refusal(scope)
            if refusal is not None:
                await _send_json(send_wrapped, *refusal)
                return
            length = dict(scope["headers"]).get(b"content-length")
            if length is None and scope["method"] in ("POST", "PUT", "PATCH"):
                body, too_big = await _read_limited(receive, self.max_body)
                if too_big:
                    await _send_json(send_wrapped, 413, self._too_big("more than"))
                    return
                receive = _replay(body)
            await self.app(scope, receive, send_wrapped)
        finally:
            self.m.requests.labels(route, str(status["code"])).inc()
            self.m.latency.labels(route).observe(time.perf_counter() - t0)

    def _too_big(self, size: str) -> dict:
        return {"error": f"body: {size} {self.max_body} bytes is above the limit (--max-body-bytes); send fewer "
                         "or smaller instances"}

    async def _refusal(self, scope) -> tuple[int, dict] | None:
        headers = dict(scope["headers"])
        protected = scope["method"] != "GET" or scope["path"].startswith("/openai/")
        if self.token and protected:
            got = headers.get(b"authorization", b"").decode("latin-1")
            if not (got.startswith("Bearer ") and hmac.compare_digest(got[7:].encode(), self.token.encode())):
                return 401, {"error": "authorization: missing or wrong bearer token; send 'Authorization: Bearer <token>'"}
        length = headers.get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                return 400, {"error": "content-length: not a number"}
            if n > self.max_body:
                return 413, {"error": f"body: {n} bytes is above the limit of {self.max_body} bytes (--max-body-bytes); "
                                      "send fewer or smaller instances"}
        return None


async def _send_json(send, status: int, payload: dict) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _read_limited(receive, limit: int) -> tuple[bytes, bool]:
    chunks, size = [], 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            break
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > limit:
            return b"", True
        chunks.append(chunk)
        if not msg.get("more_body"):
            break
    return b"".join(chunks), False


def _replay(body: bytes):
    sent = {"done": False}

    async def receive():
        if sent["done"]:
            return {"type": "http.disconnect"}
        sent["done"] = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


def openai_error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": param,
                                                               "code": None}})


# ---------------------------------------------------------------- the model


@dataclass
class Job:
    instance: Instance
    mode: str
    count_tokens: bool = False


class Decoder:
    """The model in memory and one batched decode over jobs (runs on the batcher's thread)."""

    def __init__(self, folder: Path):
        from .train.model import load_model

        self.model, self.tok, self.prompt = load_model(folder)
        self.model.eval()
        self.top_k = self.prompt.genes_per_cell or 50

    def run(self, jobs: list[Job]) -> list[dict]:
        from .decode import DecodeOptions, constrained_many, generate, prompt_text

        shown = [self.prompt.apply(j.instance.puzzle) for j in jobs]
        k = self.prompt.restated_genes
        # free text is needed for free mode, and for constrained mode unless the model uses
        # the scaffold (cellpuzzles.scaffold), which scores the candidates without it
        need = [i for i, j in enumerate(jobs) if j.mode != "constrained" or not k]
        raw = [""] * len(jobs)
        if need:
            texts = generate(self.model, self.tok, [shown[i] for i in need], DecodeOptions(batch_size=len(need)))
            for i, t in zip(need, texts):
                raw[i] = t
        cons = [i for i, j in enumerate(jobs) if j.mode == "constrained"]
        answers = dict(zip(cons, constrained_many(self.model, self.tok, [shown[i] for i in cons],
                                                  [raw[i] for i in cons], k)))
        out = []
        for i, (job, p, text) in enumerate(zip(jobs, shown, raw)):
            r = {"completion": text, "answer_text": text}
            if job.mode == "constrained":
                r["answer_text"] = answers[i]
                r["completion"] = text or r["answer_text"]
            if job.count_tokens:
                r["prompt_tokens"] = len(self.tok(prompt_text(self.tok, p), add_special_tokens=False)["input_ids"])
                r["completion_tokens"] = len(self.tok(r["completion"], add_special_tokens=False)["input_ids"])
            out.append(r)
        return out


class CellPuzzlesModel(kserve.Model):
    """Structured puzzles in, assignments out; loads its weights in the background."""

    def __init__(self, folder: str | os.PathLike, opt: ServeOptions):
        super().__init__(MODEL_NAME)
        self.folder = Path(folder)
        self.opt = opt
        self.decoder: Decoder | None = None
        self.limits = Limits(max_cells=opt.max_cells)
        self.batcher = MicroBatcher(self._run_batch, opt.max_batch_size, opt.max_wait_ms, metrics().on_batch)
        self.load_error: str | None = None

    # -- loading
    def start_loading(self) -> threading.Thread:
        t = threading.Thread(target=self._load_now, name="model-load", daemon=True)
        t.start()
        return t

    def _load_now(self) -> None:
        try:
            delay = float(os.environ.get(LOAD_DELAY_ENV) or 0)
            if delay:
                time.sleep(delay)
            self.decoder = Decoder(self.folder)
            self.limits.top_k = self.decoder.top_k
            self.ready = True
            log.info("model %s loaded from %s", MODEL_NAME, self.folder)
        except Exception as e:  # noqa: BLE001 - a server that cannot load must stop, with the reason
            self.load_error = str(e).splitlines()[0] if str(e) else type(e).__name__
            print(f"error: --model {self.folder}: {self.load_error}", file=sys.stderr, flush=True)
            os._exit(2)

    def load(self) -> bool:  # KServe calls this for a not-ready model on inference
        if not self.ready:
            raise ModelNotReady(self.name, "the model is still loading")
        return True

    def start(self) -> None:  # KServe's hook would mark the model ready at once; loading decides
        pass

    # -- decoding
    def _run_batch(self, jobs: list[Job]) -> list[dict]:
        return self.decoder.run(jobs)

    async def answer(self, instances: list[Instance]) -> list[dict]:
        results = await asyncio.gather(*(self.batcher.submit(Job(i, i.mode)) for i in instances))
        preds = []
        for inst, r in zip(instances, results):
            p = prediction(inst, r["answer_text"], inst.mode, completion=r["completion"])
            metrics().instances.labels(inst.mode, str(p["valid"]).lower()).inc()
            preds.append(p)
        return preds

    # -- KServe handlers
    async def preprocess(self, payload, headers=None):
        try:
            if isinstance(payload, InferRequest):
                return {"v2": payload, "parsed": parse_v2_instances(payload, self.limits, self.opt.mode)}
            if isinstance(payload, (bytes, str)):
                try:
                    payload = json.loads(payload)
                except ValueError:
                    raise RequestError("body: not valid JSON") from None
            return {"v2": None, "parsed": parse_instances(payload, self.limits, self.opt.mode)}
        except RequestError as e:
            raise InvalidInput(str(e)) from None

    async def predict(self, payload, headers=None, response_headers=None):
        return respond(await self.answer(payload["parsed"]), payload["v2"], self.name)


def respond(preds: list[dict], req: InferRequest | None, model_name: str):
    """V1 ``{"predictions": [...]}``, or for a V2 request one BYTES output of JSON predictions."""
    if req is None:
        return {"predictions": preds}
    data = [json.dumps(p) for p in preds]
    return InferResponse(response_id=req.id or str(uuid.uuid4()), model_name=model_name,
                         infer_outputs=[InferOutput(name="predictions", shape=[len(data)], datatype="BYTES", data=data)])


def parse_v2_instances(req: InferRequest, limits: Limits, default_mode: str) -> list[Instance]:
    """A V2 request: a BYTES input named 'instances', one JSON instance per element;
    the mode from ``parameters.mode``."""
    params = req.parameters or {}
    mode = params.get("mode", default_mode) if isinstance(params, dict) else default_mode
    if mode not in MODES:
        raise RequestError(f"parameters.mode: {mode!r} is not one of {', '.join(MODES)}")
    inp = next((x for x in req.inputs if x.name == "instances"), None)
    if inp is None:
        raise RequestError("inputs: need a BYTES input named 'instances' (one JSON instance per element)")
    if inp.datatype != "BYTES":
        raise RequestError(f"inputs.instances: datatype {inp.datatype}; use BYTES (JSON strings)")
    data = inp.data if isinstance(inp.data, list) else list(inp.data)
    out = []
    for i, item in enumerate(_flatten(data)):
        where = f"inputs.instances[{i}]"
        try:
            raw = json.loads(item.decode() if isinstance(item, bytes) else item) if isinstance(item, (str, bytes)) else item
        except ValueError:
            raise RequestError(f"{where}: not a JSON object string") from None
        out.append(parse_instance(raw, where, limits, mode))
    if not out:
        raise RequestError("inputs.instances: empty")
    return out


def _flatten(data):
    for x in data:
        if isinstance(x, list):
            yield from _flatten(x)
        else:
            yield x


# ---------------------------------------------------------------- the OpenAI-compatible route


def add_openai_routes(app, model: CellPuzzlesModel) -> None:
    """POST /openai/v1/chat/completions and GET /openai/v1/models on KServe's app. The last
    user message must be a CellPuzzles user_msg; the reply is the model's free text."""
    from fastapi.responses import JSONResponse

    from .puzzle import parse_user_msg

    async def chat(request: Request):
        try:
            body = json.loads(await request.body())
        except ValueError:
            return openai_error(400, "body: not valid JSON")
        if not isinstance(body, dict):
            return openai_error(400, "body: expected a JSON object")
        if body.get("model") not in (MODEL_NAME, None):
            return openai_error(404, f"model: {body.get('model')!r} is not served here; use {MODEL_NAME!r}",
                                "model", "not_found_error")
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            return openai_error(400, "messages: missing or empty", "messages")
        users = [m for m in msgs if isinstance(m, dict) and m.get("role") == "user"]
        if not users or not isinstance(users[-1].get("content"), str):
            return openai_error(400, "messages: need a user message with string content", "messages")
        if body.get("n", 1) != 1 or body.get("stream"):
            return openai_error(400, "n/stream: only n=1 without streaming is supported", "n")
        try:
            context, genes, candidates = parse_user_msg(users[-1]["content"])
        except ValueError as e:
            return openai_error(400, f"messages: the user message is not a CellPuzzles prompt ({e})", "messages")
        try:
            inst = parse_instance({"context": context, "candidates": candidates,
                                   "cells": [{"genes": g} for g in genes]}, "messages[-1]", model.limits, "free")
        except RequestError as e:
            return openai_error(400, str(e), "messages")
        if not model.ready:
            return openai_error(503, "model: still loading; retry when /v2/models/cellpuzzles/ready answers 200",
                                None, "server_error")
        r = await model.batcher.submit(Job(inst, "free", count_tokens=True))
        usage = {"prompt_tokens": r["prompt_tokens"], "completion_tokens": r["completion_tokens"],
                 "total_tokens": r["prompt_tokens"] + r["completion_tokens"]}
        return JSONResponse({
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": MODEL_NAME,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": r["completion"]},
                         "finish_reason": "stop", "logprobs": None}],
            "usage": usage,
        })

    async def models(_: Request):
        return JSONResponse({"object": "list", "data": [{"id": MODEL_NAME, "object": "model", "created": 0,
                                                          "owned_by": "cellpuzzles"}]})

    app.add_api_route("/openai/v1/chat/completions", chat, methods=["POST"])
    app.add_api_route("/openai/v1/models", models, methods=["GET"])


# ---------------------------------------------------------------- the server


def run_server(model: kserve.Model, port: int, max_body_bytes: int, extra_routes=None,
               on_start=None) -> None:
    """Serve one model with KServe's ModelServer on 0.0.0.0:port (REST only), with the
    gate middleware and any extra routes on KServe's FastAPI app. Blocks."""
    token = os.environ.get(TOKEN_ENV) or None
    if extra_routes:
        extra_routes(kserve_app)
    kserve_app.add_middleware(Gate, max_body_bytes=max_body_bytes, token=token)
    server = kserve.ModelServer(http_port=port, grpc_port=port + 1, enable_grpc=False, workers=1)
    server.register_model(model)  # registered while not ready: readiness reports the load
    if on_start:
        on_start()
    server.start([])


def serve(opt: ServeOptions) -> int:
    """``cellpuzzles serve``: resolve the model, start loading it, serve until stopped."""
    opt.check()
    folder = resolve_model(opt.model)
    model = CellPuzzlesModel(folder, opt)
    print(f"serving {folder} as '{MODEL_NAME}' on port {opt.port} (mode {opt.mode}, batch {opt.max_batch_size}, "
          f"wait {opt.max_wait_ms} ms); loading the model", flush=True)
    run_server(model, opt.port, opt.max_body_bytes, extra_routes=lambda app: add_openai_routes(app, model),
               on_start=model.start_loading)
    return 0

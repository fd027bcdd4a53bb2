"""The inference endpoint: a ``kserve.Model`` served by KServe's ModelServer.

Routes (model name ``cellpuzzles``): V1 ``/v1/models/cellpuzzles:predict``, V2
``/v2/models/cellpuzzles/infer`` (KServe does the protocol work), and an OpenAI-compatible
``/openai/v1/chat/completions`` added to the FastAPI app KServe's ModelServer serves
(``kserve.model_server.app``; KServe's own OpenAI routes need vLLM). Request and response
shapes: :mod:`cellpuzzles.serving.protocol`. Instances arriving together are decoded in one
batch (:mod:`cellpuzzles.serving.batching`). The model loads in the background: readiness
(V1 model status, V2 model ready) answers 503 until it is loaded.

Modes: ``constrained`` (default) always gives a valid one-to-one assignment
(decode.constrained: per-slot log-likelihoods + Hungarian); ``free`` parses the model's text
and flags an invalid answer (``valid: false`` and a reason), never fixing it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import threading
import time
import uuid
from pathlib import Path

import kserve
from kserve.errors import InferenceError as InferenceRequestError  # noqa: F401  (re-exported for the transformer)
from kserve.errors import InvalidInput, ModelNotReady
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

from cellpuzzles.core.errors import short_reason
from cellpuzzles.serving.batching import Job, MicroBatcher
from cellpuzzles.serving.http import metrics
from cellpuzzles.serving.options import ServeOptions
from cellpuzzles.serving.protocol import (
    MODEL_NAME,
    MODES,
    Instance,
    Limits,
    RequestError,
    parse_instance,
    parse_instances,
    prediction,
)

LOAD_DELAY_ENV = "CELLPUZZLES_SERVE_LOAD_DELAY_S"  # tests: hold the load to observe not-ready
log = logging.getLogger("cellpuzzles.serving")


class Decoder:
    """The model in memory and one batched decode over jobs (runs on the batcher's thread)."""

    def __init__(self, folder: Path):
        from cellpuzzles.inference.folder import load_model

        self.model, self.tok, self.prompt = load_model(folder)
        self.model.eval()
        self.top_k = self.prompt.genes_per_cell or 50

    def run(self, jobs: list[Job]) -> list[dict]:
        from cellpuzzles.inference.decode import DecodeOptions, constrained_many, generate
        from cellpuzzles.inference.prompting import prompt_text

        shown = [self.prompt.apply(j.instance.puzzle) for j in jobs]
        k = self.prompt.restated_genes
        # free text is needed for free mode, and for constrained mode unless the model uses
        # the scaffold (cellpuzzles.task.scaffold), which scores the candidates without it
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
            # the server stops the way SIGTERM stops it (uvicorn's graceful shutdown, KServe's
            # handler); serve() then raises the reason, so the command exits 2 with that one line
            self.load_error = short_reason(e)
            log.error("--model %s: %s; stopping the server", self.folder, self.load_error)
            os.kill(os.getpid(), signal.SIGTERM)

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
        if isinstance(payload, (bytes, str)):  # a JSON body sent with another content type
            try:
                payload = json.loads(payload)
            except ValueError:
                raise InvalidInput("body: not valid JSON") from None
        return parse_request(payload, self.limits, self.opt.mode)

    async def predict(self, payload, headers=None, response_headers=None):
        return respond(await self.answer(payload["parsed"]), payload["v2"], self.name)


def respond(preds: list[dict], req: InferRequest | None, model_name: str):
    """V1 ``{"predictions": [...]}``, or for a V2 request one BYTES output of JSON predictions."""
    if req is None:
        return {"predictions": preds}
    data = [json.dumps(p) for p in preds]
    return InferResponse(response_id=req.id or str(uuid.uuid4()), model_name=model_name,
                         infer_outputs=[InferOutput(name="predictions", shape=[len(data)], datatype="BYTES", data=data)])


def parse_request(payload, limits: Limits, default_mode: str) -> dict:
    """KServe's preprocess for the model server and the transformer: a V2 ``InferRequest``
    or a V1 body -> ``{"v2": the V2 request or None, "parsed": [Instance, ...]}``; a bad
    request is KServe's InvalidInput (HTTP 400) naming the field."""
    try:
        if isinstance(payload, InferRequest):
            return {"v2": payload, "parsed": parse_v2_instances(payload, limits, default_mode)}
        return {"v2": None, "parsed": parse_instances(payload, limits, default_mode)}
    except RequestError as e:
        raise InvalidInput(str(e)) from None


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



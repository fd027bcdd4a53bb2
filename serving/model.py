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

import contextlib
import json
import os
import signal
import threading
import time
import uuid
from pathlib import Path

import kserve
import orjson
from kserve.errors import InferenceError as InferenceRequestError  # noqa: F401  (re-exported for the transformer)
from kserve.errors import InvalidInput, ModelNotReady
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

from cellpuzzles.core.errors import short_reason
from cellpuzzles.serving.batching import Job, MicroBatcher
from cellpuzzles.serving.http import log, metrics
from cellpuzzles.serving.options import ServeOptions
from cellpuzzles.serving.protocol import (
    MODEL_NAME,
    MODES,
    Instance,
    Limits,
    RequestError,
    check_count,
    parse_instance,
    parse_instances,
    prediction,
)

LOAD_DELAY_ENV = "CELLPUZZLES_SERVE_LOAD_DELAY_S"  # tests: hold the load to observe not-ready


class Decoder:
    """The model in memory and one batched decode over jobs (runs on the batcher's thread),
    plus a second copy of the tokenizer for the event loop (counting prompt tokens, spotting
    names the vocabulary cannot hold): a tokenizer is not shared between threads."""

    def __init__(self, folder: Path):
        from cellpuzzles.inference.folder import load_model, load_tokenizer

        self.model, self.tok, self.prompt = load_model(folder)
        self.model.eval()
        self.top_k = self.prompt.genes_per_cell or 50
        self.counter = load_tokenizer(folder)
        self.known_names = set(self.prompt.cell_types) if self.prompt.cell_types else None

    # -- on the event loop (request checks)
    def prompt_tokens(self, puzzle) -> int:
        from cellpuzzles.inference.prompting import prompt_text

        return len(self.counter(prompt_text(self.counter, self.prompt.apply(puzzle)),
                                add_special_tokens=False)["input_ids"])

    def unknown_names(self, names: list[str]) -> list[str] | None:
        """Candidates the model never saw, or None when the folder does not record its training
        types (``cell_types`` in cellpuzzles.json: written by SFT and by the tiny model's builder;
        a pretrained folder before SFT has none)."""
        if self.known_names is None:
            return None
        return [n for n in names if n not in self.known_names]

    def free_budget(self, puzzle) -> int:
        """New tokens free decoding allows this puzzle (inference.budget, from the folder's
        tokens_per_cell); on the event loop, with the counting tokenizer."""
        from cellpuzzles.inference.budget import new_token_budget

        return new_token_budget(self.counter, [self.prompt.apply(puzzle)], self.prompt.tokens_per_cell)

    # -- on the decode thread
    def _free(self, shown: list, jobs: list[Job]) -> list[tuple[str, int | None, bool | None]]:
        """(text, new tokens, stopped by the model) for jobs, one generate call per (token
        budget, temperature). The token counts are the generated ids themselves (re-tokenizing
        the text can merge pieces and count fewer)."""
        from cellpuzzles.inference.decode import DecodeOptions, generate

        groups: dict[tuple, list[int]] = {}
        for i, j in enumerate(jobs):
            groups.setdefault((j.max_new_tokens, j.temperature), []).append(i)
        out: list = [("", None, None)] * len(jobs)
        for (budget, temp), idx in groups.items():
            opt = DecodeOptions(max_new_tokens=budget, tokens_per_cell=self.prompt.tokens_per_cell,
                                do_sample=temp > 0, temperature=temp or 1.0, batch_size=len(idx))
            with generated_rows(self.model, self.tok) as rows:
                texts = generate(self.model, self.tok, [shown[i] for i in idx], opt)
            for i, t in zip(idx, texts):
                out[i] = (t, *rows.get(t, (None, None)))
        return out

    def run(self, jobs: list[Job]) -> list[dict]:
        from cellpuzzles.inference.decode import constrained_many
        from cellpuzzles.inference.prompting import prompt_text

        shown = [self.prompt.apply(j.instance.puzzle) for j in jobs]
        k = self.prompt.restated_genes
        # free text is needed for free mode, and for constrained mode unless the model uses
        # the scaffold (cellpuzzles.task.scaffold), which scores the candidates without it
        need = [i for i, j in enumerate(jobs) if j.mode != "constrained" or not k]
        raw: list = [("", None, None)] * len(jobs)
        for i, r in zip(need, self._free([shown[i] for i in need], [jobs[i] for i in need])):
            raw[i] = r
        cons = [i for i, j in enumerate(jobs) if j.mode == "constrained"]
        answers = dict(zip(cons, constrained_many(self.model, self.tok, [shown[i] for i in cons],
                                                  [raw[i][0] for i in cons], k)))
        out = []
        for i, (job, p, (text, n_new, stopped)) in enumerate(zip(jobs, shown, raw)):
            r = {"completion": text, "answer_text": text}
            if job.mode == "constrained":
                r["answer_text"] = answers[i]
                r["completion"] = text or r["answer_text"]
            if job.count_tokens:
                r["prompt_tokens"] = len(self.tok(prompt_text(self.tok, p), add_special_tokens=False)["input_ids"])
                r["completion_tokens"] = n_new if n_new is not None else \
                    len(self.tok(r["completion"], add_special_tokens=False)["input_ids"])
                r["finish_reason"] = "length" if stopped is False else "stop"
            out.append(r)
        return out


@contextlib.contextmanager
def generated_rows(model, tok):
    """Watch ``model.generate`` for the block: yields {decoded text: (new tokens, stopped)}
    for every row it generated, the count up to and including the first stop token (the
    generation config's eos) and whether there was one (False: the budget ended the row)."""
    rows: dict[str, tuple[int, bool]] = {}
    original = model.generate

    def watched(*args, **kwargs):
        out = original(*args, **kwargs)
        cfg = kwargs.get("generation_config")
        stop = getattr(cfg, "eos_token_id", None)
        stop = {tok.eos_token_id} if stop is None else set(stop if isinstance(stop, list) else [stop])
        start = kwargs["input_ids"].shape[1]
        for row in out[:, start:].tolist():
            at = next((k for k, t in enumerate(row) if t in stop), None)
            rows[tok.decode(row, skip_special_tokens=True)] = (len(row), False) if at is None else (at + 1, True)
        return out

    model.generate = watched  # an instance attribute over the method, on the decode thread only
    try:
        yield rows
    finally:
        del model.generate


class CellPuzzlesModel(kserve.Model):
    """Structured puzzles in, assignments out; loads its weights in the background."""

    def __init__(self, folder: str | os.PathLike, opt: ServeOptions):
        super().__init__(MODEL_NAME)
        self.folder = Path(folder)
        self.opt = opt
        self.decoder: Decoder | None = None
        self.limits = Limits(max_cells=opt.max_cells, max_instances=opt.max_instances, max_genes=opt.max_genes)
        self.batcher = MicroBatcher(self._run_batch, opt.max_batch_size, opt.max_wait_ms, metrics().on_batch,
                                    interleave=opt.interleave)
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
            reason = short_reason(e)  # the project's own errors already name --model: say it once
            self.load_error = reason if reason.startswith("--model ") else f"--model {self.folder}: {reason}"
            log.error("%s; stopping the server", self.load_error)
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

    def check_instances(self, instances: list[Instance], where: str = "instances") -> None:
        """Limits that need the model's tokenizer: tokens per prompt (so a long context
        sentence, long names or many genes are bounded too). RequestError names the instance."""
        if self.decoder is None:
            raise ModelNotReady(self.name, "the model is still loading")
        for i, inst in enumerate(instances):
            n = self.decoder.prompt_tokens(inst.puzzle)
            if n > self.opt.max_prompt_tokens:
                raise RequestError(f"{where}[{i}]: its prompt is {n} tokens, above the limit of "
                                   f"{self.opt.max_prompt_tokens} (--max-prompt-tokens); send fewer cells or genes, "
                                   "or a shorter context")

    async def answer(self, instances: list[Instance]) -> list[dict]:
        results = await self.batcher.submit_many([Job(i, i.mode) for i in instances])
        preds = []
        for inst, r in zip(instances, results):
            unknown = self.decoder.unknown_names(inst.puzzle.candidates)
            p = prediction(inst, r["answer_text"], inst.mode, completion=r["completion"], unknown_candidates=unknown)
            if unknown:  # None: the tokenizer cannot tell; []: all known
                p["warning"] = (f"candidates unknown to the model's vocabulary ({', '.join(unknown[:3])}): it cannot "
                                "score them, so their placement is not the model's judgement; check spelling and case")
            metrics().instances.labels(inst.mode, str(p["valid"]).lower()).inc()
            preds.append(p)
        return preds

    # -- KServe handlers
    async def preprocess(self, payload, headers=None):
        if isinstance(payload, (bytes, str)):  # a JSON body sent with another content type
            try:
                payload = orjson.loads(payload)
            except orjson.JSONDecodeError as e:
                raise InvalidInput(f"body: not valid JSON ({e})") from None
        parsed = parse_request(payload, self.limits, self.opt.mode)
        try:
            self.check_instances(parsed["parsed"], "instances" if parsed["v2"] is None else "inputs.instances")
        except RequestError as e:
            raise InvalidInput(str(e)) from None
        return parsed

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
    data = list(_flatten(inp.data if isinstance(inp.data, list) else list(inp.data)))
    check_count(len(data), "inputs.instances", limits)
    out = []
    for i, item in enumerate(data):
        where = f"inputs.instances[{i}]"
        try:
            raw = orjson.loads(item) if isinstance(item, (str, bytes)) else item
        except orjson.JSONDecodeError as e:
            raise RequestError(f"{where}: not a JSON object string ({e})") from None
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



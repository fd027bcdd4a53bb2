"""The production topology with vLLM: this KServe transformer holds the project's code and
talks to an OpenAI-compatible predictor (KServe's Hugging Face runtime on vLLM) over its
``/openai/v1/chat/completions`` route.

structured request (the schema of :mod:`cellpuzzles.serving.protocol`, V1 or V2)
  -> Puzzle -> the CellPuzzles chat messages (puzzle.messages(): SYSTEM_MSG + user_msg)
  -> predictor completion -> parsed and validated (protocol.check_completion) -> response.

free mode: the model's answer as written; not a valid one-to-one answer -> ``valid: false``
and the reason.

constrained mode, chosen here: vLLM gives no per-slot log-likelihood matrix cheaply (top-20
logprobs per generated token do not score every candidate at every slot), so the
transformer does NOT ask for logprobs. It keeps the model's own answer when it is valid;
otherwise it assigns one-to-one with the Hungarian method over the model's answer
(score 1 where the model put candidate j at cell i, first occurrence of a repeated label
preferred, 0 elsewhere): every label the model placed once stays, repeated, unknown or
missing slots get the remaining candidates. Such an answer is returned with ``valid: true``,
``repaired: true`` and the reason the model's own answer was invalid, so a client can tell
repaired answers from the model's own. (`cellpuzzles serve`, which holds the weights, scores
every slot instead: decode.constrained.)

The predictor's bearer token, if it needs one, comes from CELLPUZZLES_PREDICTOR_TOKEN.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass

import numpy as np

from cellpuzzles.core.errors import CellPuzzlesError
from cellpuzzles.inference.folder import PromptOptions
from cellpuzzles.serving.http import metrics
from cellpuzzles.serving.model import InferenceRequestError, kserve, parse_request, respond
from cellpuzzles.serving.protocol import MODEL_NAME, MODES, Instance, Limits, check_completion, prediction
from cellpuzzles.serving.server import run_server
from cellpuzzles.task.assign import assign_labels
from cellpuzzles.task.puzzle import format_completion

PREDICTOR_TOKEN_ENV = "CELLPUZZLES_PREDICTOR_TOKEN"


@dataclass
class TransformerOptions:
    predictor_url: str
    port: int = 8080
    predictor_model: str = MODEL_NAME
    mode: str = "constrained"
    max_cells: int = 30
    max_body_bytes: int = 1_000_000
    timeout_s: float = 300.0
    genes_per_cell: int = 50

    def check(self) -> None:
        if not self.predictor_url.startswith(("http://", "https://")):
            raise CellPuzzlesError(f"--predictor-url {self.predictor_url}: give an http(s):// URL")
        if self.mode not in MODES:
            raise CellPuzzlesError(f"--mode {self.mode}: use one of {', '.join(MODES)}")
        if self.genes_per_cell < 1 or self.max_cells < 1 or self.max_body_bytes < 1:
            raise CellPuzzlesError("--genes-per-cell, --max-cells and --max-body-bytes must be at least 1")

    @property
    def chat_url(self) -> str:
        base = self.predictor_url.rstrip("/")
        for suffix in ("/chat/completions", "/openai/v1", "/v1"):
            base = base.removesuffix(suffix)
        return base + "/openai/v1/chat/completions"


def repair(inst: Instance, labels: list[str] | None) -> list[str]:
    """A one-to-one assignment keeping as much of the model's answer as possible (Hungarian)."""
    cands = inst.puzzle.candidates
    index = {c.lower(): j for j, c in enumerate(cands)}
    scores = np.zeros((inst.puzzle.n, inst.puzzle.n))
    seen: set[int] = set()
    for i, label in enumerate((labels or [])[: inst.puzzle.n]):
        j = index.get(label.strip().lower())
        if j is not None:
            scores[i, j] = 0.5 if j in seen else 1.0
            seen.add(j)
    return assign_labels(scores, cands)


class CellPuzzlesTransformer(kserve.Model):
    def __init__(self, opt: TransformerOptions):
        super().__init__(MODEL_NAME)
        self.opt = opt
        self.limits = Limits(max_cells=opt.max_cells, top_k=opt.genes_per_cell)
        self.prompt = PromptOptions(genes_per_cell=opt.genes_per_cell)
        self._client = None
        self.ready = True

    @property
    def client(self):
        import httpx

        if self._client is None:
            headers = {}
            if os.environ.get(PREDICTOR_TOKEN_ENV):
                headers["Authorization"] = f"Bearer {os.environ[PREDICTOR_TOKEN_ENV]}"
            self._client = httpx.AsyncClient(timeout=self.opt.timeout_s, headers=headers)
        return self._client

    async def preprocess(self, payload, headers=None):
        return parse_request(payload, self.limits, self.opt.mode)

    async def complete(self, inst: Instance) -> str:
        import httpx

        shown = self.prompt.apply(inst.puzzle)
        body = {"model": self.opt.predictor_model, "messages": shown.messages(), "temperature": 0}
        try:
            r = await self.client.post(self.opt.chat_url, json=body)
        except httpx.HTTPError as e:
            raise InferenceRequestError(f"predictor {self.opt.chat_url}: unreachable ({type(e).__name__}: {e})") from None
        if r.status_code != 200:
            raise InferenceRequestError(f"predictor {self.opt.chat_url}: HTTP {r.status_code} {r.text[:200]}")
        try:
            return r.json()["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError):
            raise InferenceRequestError(f"predictor {self.opt.chat_url}: not a chat completion: {r.text[:200]}") from None

    def answer_one(self, inst: Instance, completion: str) -> dict:
        if inst.mode == "free":
            return prediction(inst, completion, "free")
        check = check_completion(inst.puzzle, completion)
        if check.valid:
            return prediction(inst, completion, "constrained", repaired=False)
        from cellpuzzles.task.puzzle import think_part

        fixed = format_completion(think_part(completion), repair(inst, check.labels))
        out = prediction(inst, fixed, "constrained", completion=completion, repaired=True)
        out["reason"] = f"repaired: {check.reason}"
        return out

    async def predict(self, payload, headers=None, response_headers=None):
        instances = payload["parsed"]
        completions = await asyncio.gather(*(self.complete(i) for i in instances))
        preds = [self.answer_one(i, c) for i, c in zip(instances, completions)]
        for p in preds:
            metrics().instances.labels(p["mode"], str(p["valid"]).lower()).inc()
        return respond(preds, payload["v2"], self.name)


def serve_transformer(opt: TransformerOptions) -> int:
    """``cellpuzzles serve-transformer``: serve until stopped."""
    opt.check()
    print(f"transformer '{MODEL_NAME}' on port {opt.port} -> {opt.chat_url} (model {opt.predictor_model}, "
          f"mode {opt.mode})", flush=True)
    run_server(CellPuzzlesTransformer(opt), opt.port, opt.max_body_bytes)
    return 0

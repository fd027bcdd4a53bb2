"""The production topology with vLLM: this KServe transformer holds the project's code and
talks to an OpenAI-compatible predictor (vLLM's api_server, or KServe's Hugging Face runtime
on vLLM) over its completions route.

structured request (the schema of :mod:`cellpuzzles.serving.protocol`, V1 or V2)
  -> Puzzle in the model's prompt form (the model folder's ``cellpuzzles.json``)
  -> the prompt's token ids (the folder's own tokenizer, which plain ``AutoTokenizer`` and
     vLLM load identically: the model-folder contract) -> predictor -> response.

The transformer reads the served model folder (``--model-dir``: a folder, or models:/NAME@ALIAS;
KServe's storage initializer puts the InferenceService's storageUri at /mnt/models) for its
tokenizer and prompt options, never a flag that could disagree with the model.

free mode: greedy text (every sampling setting at its "no effect" value, whatever the model's
generation_config says), parsed; not a valid one-to-one answer -> ``valid: false`` and the reason.

constrained mode, ``--constrained-by scores`` (default): the same decision rule as the
project's own server (cellpuzzles.inference.decode -> slot_batch.fill_slots, with its layouts
and slot_tails): each cell's slot is scored for every candidate by the log-likelihood of the
candidate's tokens as the tokenizer encodes them in place, from the predictor's prompt
logprobs (``/completions`` with ``prompt_logprobs``: one request per slot, one prompt of token
ids per candidate); earlier slots hold the best unused candidate; the cells x candidates
matrix is assigned one-to-one (Hungarian). Slots are the scaffold's type
slots for a model trained on scaffold traces, else the answer slots after the model's own
<think> part. ``--constrained-by repair`` is the named fallback for predictors without prompt
logprobs: keep the model's free answer when valid, else Hungarian over the labels it wrote
(``repaired: true`` and the reason).

The predictor's bearer token, if it needs one, comes from CELLPUZZLES_PREDICTOR_TOKEN.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass

import numpy as np

from cellpuzzles.core.errors import CellPuzzlesError
from cellpuzzles.inference.budget import new_token_budget
from cellpuzzles.inference.engine_request import GREEDY
from cellpuzzles.serving.http import metrics
from cellpuzzles.serving.model import InferenceRequestError, kserve, parse_request, respond
from cellpuzzles.serving.protocol import MODEL_NAME, MODES, Instance, Limits, check_completion, prediction
from cellpuzzles.serving.server import resolve_model, run_server
from cellpuzzles.task.assign import assign_labels
from cellpuzzles.task.puzzle import Puzzle, format_completion, think_part

PREDICTOR_TOKEN_ENV = "CELLPUZZLES_PREDICTOR_TOKEN"
CONSTRAINED_BY = ("scores", "repair")


@dataclass
class TransformerOptions:
    predictor_url: str
    model_dir: str = ""  # the served model folder (or models:/NAME@ALIAS): tokenizer and prompt options
    port: int = 8080
    predictor_model: str = MODEL_NAME
    mode: str = "constrained"
    constrained_by: str = "scores"
    max_cells: int = 30
    max_body_bytes: int = 1_000_000
    timeout_s: float = 300.0

    def check(self) -> None:
        if not self.predictor_url.startswith(("http://", "https://")):
            raise CellPuzzlesError(f"--predictor-url {self.predictor_url}: give an http(s):// URL")
        if not self.model_dir:
            raise CellPuzzlesError("--model-dir: missing; give the served model folder (or models:/NAME@ALIAS), whose "
                                   "tokenizer and prompt options the transformer applies")
        if self.mode not in MODES:
            raise CellPuzzlesError(f"--mode {self.mode}: use one of {', '.join(MODES)}")
        if self.constrained_by not in CONSTRAINED_BY:
            raise CellPuzzlesError(f"--constrained-by {self.constrained_by}: use one of {', '.join(CONSTRAINED_BY)}")
        if self.max_cells < 1 or self.max_body_bytes < 1:
            raise CellPuzzlesError("--max-cells and --max-body-bytes must be at least 1")

    @property
    def openai_base(self) -> str:
        """The predictor's OpenAI base: a URL ending in /v1 as given (vLLM's api_server), else
        KServe's Hugging Face runtime route /openai/v1."""
        base = self.predictor_url.rstrip("/")
        for suffix in ("/chat/completions", "/completions"):
            base = base.removesuffix(suffix)
        return base if base.endswith("/v1") else base + "/openai/v1"


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
        from cellpuzzles.inference.folder import load_prompt_options, load_tokenizer

        super().__init__(MODEL_NAME)
        self.opt = opt
        folder = resolve_model(opt.model_dir)
        self.tok = load_tokenizer(folder)
        self.prompt = load_prompt_options(folder)
        self.limits = Limits(max_cells=opt.max_cells, top_k=self.prompt.genes_per_cell or 50)
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

    # -- the predictor
    async def _post(self, route: str, body: dict) -> dict:
        import httpx

        url = self.opt.openai_base + route
        try:
            r = await self.client.post(url, json={"model": self.opt.predictor_model, **GREEDY, **body})
        except httpx.HTTPError as e:
            raise InferenceRequestError(f"predictor {url}: unreachable ({type(e).__name__}: {e})") from None
        if r.status_code != 200:
            raise InferenceRequestError(f"predictor {url}: HTTP {r.status_code} {r.text[:200]}")
        try:
            out = r.json()
            out["choices"] = sorted(out["choices"], key=lambda c: c["index"])
            return out
        except (ValueError, KeyError, TypeError):
            raise InferenceRequestError(f"predictor {url}: not a completions response: {r.text[:200]}") from None

    async def free_text(self, shown: Puzzle) -> str:
        """Greedy text on the chat route (every OpenAI-compatible predictor has it; the predictor
        applies the folder's chat template and tokenizer, which give the project's ids)."""
        budget = new_token_budget(self.tok, [shown], self.prompt.tokens_per_cell)  # the model's own (evaluate's)
        out = await self._post("/chat/completions", {"messages": shown.messages(), "max_tokens": budget})
        try:
            return out["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise InferenceRequestError(f"predictor {self.opt.openai_base}: not a chat completion") from None

    async def tail_scores(self, context: list[int], tails: list[list[int]]) -> np.ndarray:
        """log p(tail | context) for each candidate's tail tokens, from the predictor's prompt
        logprobs of ``context + tail`` (one prompt per candidate, one request)."""
        prompts = [context + t for t in tails]
        choices = (await self._post("/completions", {"prompt": prompts, "max_tokens": 1,
                                                      "prompt_logprobs": 0}))["choices"]
        scores = np.zeros(len(tails))
        for j, (ids, choice) in enumerate(zip(prompts, choices)):
            lp = choice.get("prompt_logprobs") if len(choices) == len(prompts) else None
            if not isinstance(lp, list) or len(lp) != len(ids):
                raise InferenceRequestError(f"predictor {self.opt.openai_base}: no prompt logprobs; it must accept "
                                            "'prompt_logprobs' (vLLM), or run with --constrained-by repair")
            scores[j] = sum(lp[k][str(ids[k])]["logprob"] for k in range(len(context), len(ids)))
        return scores

    async def scored(self, shown: Puzzle, completion: str) -> tuple[str, np.ndarray]:
        """The project's constrained rule (inference.slot_batch.fill_slots for one puzzle), with
        the predictor's likelihoods: at slot i the text so far and each candidate are tokenized
        in place (slot_tails: the environment's head, one tail per candidate), every tail is
        scored after the prompt and the completion's ids so far, the best unused candidate is
        written; then the cells x candidates matrix is assigned one-to-one (Hungarian)."""
        from cellpuzzles.inference.scaffold_batch import answer_layout, prompt_ids, scaffold_layout
        from cellpuzzles.inference.slot_batch import best_unused
        from cellpuzzles.inference.slot_tails import slot_tails
        from cellpuzzles.task.scaffold import think_lines

        k, think = self.prompt.restated_genes, think_part(completion)
        lay = scaffold_layout(shown, k) if k else answer_layout(shown, think)
        prompt = prompt_ids(self.tok, [shown])[0]
        text, ids, chosen = "", [], []
        scores = np.zeros((lay.n, len(lay.candidates)))
        for i in range(lay.n):
            text += lay.before(i)
            after = lay.before(i + 1) if i + 1 < lay.n else lay.closing([lay.candidates[j] for j in chosen] + ["?"])
            head, tails, _ = slot_tails(self.tok, text, lay.candidates, after)
            if head[: len(ids)] != ids:
                raise InferenceRequestError(f"slot {i}: the tokens of the completion so far changed ({text[-60:]!r})")
            ids = head
            scores[i] = await self.tail_scores(prompt + ids, tails)
            j = best_unused(scores[i], set(chosen))
            chosen.append(j)
            text += lay.candidates[j]
            ids = ids + tails[j]
        labels = assign_labels(scores, shown.candidates)
        return format_completion(think_lines(shown, k, labels) if k else think, labels), scores

    async def answer_one(self, inst: Instance) -> dict:
        shown = self.prompt.apply(inst.puzzle)
        scaffold = inst.mode == "constrained" and self.opt.constrained_by == "scores" and self.prompt.restated_genes
        completion = "" if scaffold else await self.free_text(shown)
        if inst.mode == "free":
            return prediction(inst, completion, "free")
        if self.opt.constrained_by == "scores":
            answer, _ = await self.scored(shown, completion)
            return prediction(inst, answer, "constrained", completion=completion or answer)
        check = check_completion(inst.puzzle, completion)
        if check.valid:
            return prediction(inst, completion, "constrained", repaired=False)
        fixed = format_completion(think_part(completion), repair(inst, check.labels))
        out = prediction(inst, fixed, "constrained", completion=completion, repaired=True)
        out["reason"] = f"repaired: {check.reason}"
        return out

    async def predict(self, payload, headers=None, response_headers=None):
        instances = payload["parsed"]
        preds = await asyncio.gather(*(self.answer_one(i) for i in instances))
        for p in preds:
            metrics().instances.labels(p["mode"], str(p["valid"]).lower()).inc()
        return respond(list(preds), payload["v2"], self.name)


def serve_transformer(opt: TransformerOptions) -> int:
    """``cellpuzzles serve-transformer``: serve until stopped."""
    opt.check()
    model = CellPuzzlesTransformer(opt)
    print(f"transformer '{MODEL_NAME}' on port {opt.port} -> {opt.openai_base} (model {opt.predictor_model}, "
          f"mode {opt.mode}, constrained by {opt.constrained_by}, prompt {model.prompt})", flush=True)
    run_server(model, opt.port, opt.max_body_bytes)
    return 0

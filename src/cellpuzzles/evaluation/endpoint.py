"""Evaluate a deployed model over HTTP: the same test puzzles, scoring and files as
``evaluate_model``, with the answers from a running service instead of local weights.

protocol ``v1``      the project's structured KServe V1 route (``cellpuzzles serve``, or
                     ``serve-transformer`` in front of vLLM): ``{URL}/v1/models/cellpuzzles:predict``;
                     free and constrained modes. A constrained answer is scored as the service
                     returned it (its reasoning and its assigned labels).
protocol ``openai``  an OpenAI-compatible chat route (vLLM's api_server, KServe's Hugging Face
                     runtime): ``{URL}/chat/completions`` with URL the OpenAI base (…/v1); free
                     mode only (greedy). The engine knows nothing of the project's prompt options,
                     so they come from the model folder (``prompt``) and are applied here.

Requests go out ``concurrency`` at a time; a service that cannot be reached or answers with
an error stops the evaluation with one line naming the URL.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from cellpuzzles.core.errors import CellPuzzlesError
from cellpuzzles.evaluation.evaluate import score_mode
from cellpuzzles.inference.engine_request import GREEDY
from cellpuzzles.inference.folder import PromptOptions
from cellpuzzles.task.puzzle import Puzzle, format_completion

PROTOCOLS = ("v1", "openai")
MODEL_NAME = "cellpuzzles"  # the name every CellPuzzles service serves (serving.protocol.MODEL_NAME)
TOKEN_ENV = "CELLPUZZLES_API_TOKEN"  # a bearer token for the service, when it wants one


@dataclass
class EndpointOptions:
    url: str
    protocol: str = "v1"
    model_name: str = MODEL_NAME  # the served model name on the openai protocol
    concurrency: int = 4
    timeout_s: float = 300.0
    max_tokens: int | None = None  # openai protocol; None: the model folder's budget (inference.budget; needs model_dir)
    model_dir: str | None = None  # the served model's folder: prompt options and token budget for the openai protocol

    def check(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise CellPuzzlesError(f"--endpoint {self.url}: give an http(s):// URL")
        if self.protocol not in PROTOCOLS:
            raise CellPuzzlesError(f"--protocol {self.protocol}: use one of {', '.join(PROTOCOLS)}")
        if self.concurrency < 1:
            raise CellPuzzlesError(f"--concurrency {self.concurrency}: must be at least 1")
        if self.protocol == "openai" and not (self.max_tokens or self.model_dir):
            raise CellPuzzlesError("--protocol openai needs --model FOLDER (the served model's prompt options and token "
                                   "budget) or --max-new-tokens N")


def v1_instance(p: Puzzle, mode: str) -> dict:
    """A structured V1 instance for a puzzle: its context sentence, ranked genes, candidates."""
    return {"context": p.context, "cells": [{"id": f"c{i}", "genes": list(g)} for i, g in enumerate(p.genes)],
            "candidates": list(p.candidates), "mode": mode}


def scored_text(pred: dict) -> str:
    """The completion to score from one V1 prediction: free mode, the model's text as written;
    constrained mode, the answer the service assigned (its reasoning and labels)."""
    if pred.get("mode") == "constrained" and pred.get("valid") and isinstance(pred.get("answer"), list):
        return format_completion(pred.get("reasoning") or "", pred["answer"])
    return pred.get("completion") or ""


class _Client:
    def __init__(self, opt: EndpointOptions):
        import httpx

        headers = {"Authorization": f"Bearer {os.environ[TOKEN_ENV]}"} if os.environ.get(TOKEN_ENV) else {}
        self.opt = opt
        self.http = httpx.Client(timeout=opt.timeout_s, headers=headers)
        self.tok = self.prompt = None
        if opt.model_dir:
            from cellpuzzles.inference.folder import load_prompt_options, load_tokenizer

            self.tok, self.prompt = load_tokenizer(opt.model_dir), load_prompt_options(opt.model_dir)

    def budget(self, p: Puzzle) -> int:
        """New tokens for a free answer: the option, else the model's own budget (as evaluate_model's)."""
        from cellpuzzles.inference.budget import new_token_budget

        return self.opt.max_tokens or new_token_budget(self.tok, [p], self.prompt.tokens_per_cell)

    def post(self, url: str, body: dict) -> dict:
        import httpx

        try:
            r = self.http.post(url, json=body)
        except httpx.HTTPError as e:
            raise CellPuzzlesError(f"--endpoint {url}: unreachable ({type(e).__name__}: {e}); check the URL and that "
                                   "the service is running") from None
        if r.status_code != 200:
            raise CellPuzzlesError(f"--endpoint {url}: HTTP {r.status_code}: {r.text[:200]}")
        try:
            return r.json()
        except ValueError:
            raise CellPuzzlesError(f"--endpoint {url}: the answer is not JSON: {r.text[:200]}") from None

    def v1(self, p: Puzzle, mode: str) -> str:
        url = self.opt.url.rstrip("/") + f"/v1/models/{MODEL_NAME}:predict"
        body = self.post(url, {"instances": [v1_instance(p, mode)]})
        try:
            return scored_text(body["predictions"][0])
        except (KeyError, IndexError, TypeError):
            raise CellPuzzlesError(f"--endpoint {url}: not a V1 prediction: {str(body)[:200]}") from None

    def chat(self, p: Puzzle) -> str:
        url = self.opt.url.rstrip("/") + "/chat/completions"
        body = self.post(url, {"model": self.opt.model_name, "messages": p.messages(), **GREEDY,
                               "max_tokens": self.budget(p)})
        try:
            return body["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise CellPuzzlesError(f"--endpoint {url}: not a chat completion: {str(body)[:200]}") from None


def served_completions(opt: EndpointOptions, puzzles: Sequence[Puzzle], mode: str,
                       prompt: PromptOptions | None = None) -> list[str]:
    """The completion to score for each puzzle, from the service, in order."""
    opt.check()
    if opt.protocol == "openai" and mode != "free":
        raise CellPuzzlesError("--protocol openai: only --mode free (an OpenAI route returns text; constrained "
                               "decoding needs the v1 route of cellpuzzles serve or serve-transformer)")
    client = _Client(opt)
    with ThreadPoolExecutor(max_workers=opt.concurrency) as pool:
        if opt.protocol == "v1":
            return list(pool.map(lambda p: client.v1(p, mode), puzzles))
        return list(pool.map(client.chat, [(prompt or PromptOptions()).apply(p) for p in puzzles]))


def evaluate_endpoint(opt: EndpointOptions, test: Sequence[Puzzle], out_dir: str | os.PathLike | None = None,
                      modes: Sequence[str] = ("free", "constrained"), prompt: PromptOptions | None = None,
                      name: str = "endpoint", seed: int = 0) -> dict[str, dict]:
    """Every test puzzle through the service in each mode, scored like ``evaluate_model``;
    writes ``predictions_<name>_<mode>.jsonl`` and ``metrics_<name>_<mode>.json``."""
    served = {mode: served_completions(opt, test, mode, prompt) for mode in modes}  # all or nothing written
    return {mode: score_mode(test, completions, out_dir, name, mode, seed) for mode, completions in served.items()}

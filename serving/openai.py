"""The OpenAI-compatible chat route on KServe's app (KServe's own OpenAI routes need vLLM)."""

from __future__ import annotations

import time
import uuid

import orjson
from fastapi import Request  # module level: FastAPI resolves route annotations from module globals

from cellpuzzles.serving.batching import Job
from cellpuzzles.serving.protocol import MODEL_NAME, RequestError, parse_instance


def openai_error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": param,
                                                               "code": None}})


def sampling(body: dict) -> tuple[int | None, float]:
    """(max_tokens or None, temperature) from a chat request; 0 is greedy, the default."""
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise RequestError(f"max_tokens: {max_tokens!r} is not a whole number of at least 1")
    temperature = body.get("temperature")
    if temperature is None:
        temperature = 0.0
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
        raise RequestError(f"temperature: {temperature!r} is not a number from 0 to 2")
    return max_tokens, float(temperature)


def add_openai_routes(app, model) -> None:
    """POST /openai/v1/chat/completions and GET /openai/v1/models on KServe's app. The last
    user message must be a CellPuzzles user_msg; the reply is the model's free text, greedy
    unless ``temperature`` > 0, at most ``max_tokens`` new tokens (``finish_reason: "length"``
    when that budget, or the model's own, ended it); the request limits of the other routes apply."""
    from fastapi.responses import JSONResponse

    from cellpuzzles.task.puzzle import parse_user_msg

    async def chat(request: Request):
        try:  # RequestGuard has checked the body decodes; this parses it for the route
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError as e:
            return openai_error(400, f"body: not valid JSON ({e})")
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
            max_tokens, temperature = sampling(body)
        except RequestError as e:
            return openai_error(400, str(e), str(e).split(":", 1)[0])
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
        try:
            model.check_instances([inst], "messages")
        except RequestError as e:
            return openai_error(400, str(e), "messages")
        # the client's max_tokens caps the model's own budget (it never raises it)
        budget = model.decoder.free_budget(inst.puzzle)
        budget = min(budget, max_tokens) if max_tokens else budget
        r = await model.batcher.submit(Job(inst, "free", count_tokens=True, max_new_tokens=budget,
                                           temperature=temperature))
        usage = {"prompt_tokens": r["prompt_tokens"], "completion_tokens": r["completion_tokens"],
                 "total_tokens": r["prompt_tokens"] + r["completion_tokens"]}
        return JSONResponse({
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": MODEL_NAME,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": r["completion"]},
                         "finish_reason": r["finish_reason"], "logprobs": None}],
            "usage": usage,
        })

    async def models(_: Request):
        return JSONResponse({"object": "list", "data": [{"id": MODEL_NAME, "object": "model", "created": 0,
                                                          "owned_by": "cellpuzzles"}]})

    app.add_api_route("/openai/v1/chat/completions", chat, methods=["POST"])
    app.add_api_route("/openai/v1/models", models, methods=["GET"])

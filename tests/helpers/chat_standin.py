"""A local STAND-IN for an OpenAI-compatible chat-completions endpoint, for tests only.

No real API (OpenAI, a vLLM server, a KServe OpenAI route) is reachable from the test
machines, so this small ``http.server`` speaks just enough of the protocol
(``POST /v1/chat/completions`` -> a ``chat.completion`` object with ``choices`` and
``usage``) for the official ``openai`` client to talk to it. It runs on 127.0.0.1 on a
free port in a background thread and is scriptable per test:

* ``mode`` (default for every call): ``"correct"`` answers from the answer key, ``"wrong"``
  answers with the labels rotated by one (a well-formed but wrong answer), ``"empty"``
  returns ``content: ""``, ``"null"`` returns ``content: null``, ``"garbage"`` returns text
  without the answer tags, ``"500"`` returns HTTP 500, ``"hang"`` holds the request for
  ``hang_s`` seconds before answering correctly (longer than the client's timeout);
* ``script``: a list of modes consumed one per call before ``mode`` applies (e.g.
  ``["429", "429"]`` makes the first two calls rate-limited); ``"429"`` answers with
  ``Retry-After: 0`` (plus ``retry-after-ms: 1`` so the client's retry is quick);
* ``delay_s``: sleep this long inside every request (to observe concurrency).

It counts calls (``calls``), keeps every request body (``requests``) and records the most
requests in flight at once (``max_inflight``).

Answer key: ``answers`` maps a ``user_msg`` or a ``puzzle_id`` to the gold labels; give
``puzzles`` to fill it (and to resolve puzzle ids). The user message of each request is
parsed with :func:`cellpuzzles.task.puzzle.parse_user_msg`; an unknown one is answered with its
candidates in the listed order.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence

from cellpuzzles.task.puzzle import Puzzle, format_completion, parse_user_msg

from helpers.local_http import LocalHTTPServer, QuietJSONHandler


class ChatStandin(LocalHTTPServer):
    def __init__(
        self,
        puzzles: Iterable[Puzzle] = (),
        answers: Mapping[str, Sequence[str]] | None = None,
        mode: str = "correct",
        script: Sequence[str] = (),
        delay_s: float = 0.0,
        hang_s: float = 3.0,
    ):
        puzzles = list(puzzles)
        by_id = {p.puzzle_id: p for p in puzzles}
        self.answers: dict[str, list[str]] = {p.user_msg: list(p.answer) for p in puzzles}
        for k, labels in (answers or {}).items():
            self.answers[by_id[k].user_msg if k in by_id else k] = list(labels)
        self.mode = mode
        self.script = list(script)
        self.delay_s = delay_s
        self.hang_s = hang_s
        self.calls = 0
        self.requests: list[dict] = []
        self.inflight = 0
        self.max_inflight = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._serve(self._handler_class())

    # ---- lifecycle ----
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        self._stop.set()  # releases hanging handlers
        super().stop()

    # ---- the answers ----
    def _next_mode(self) -> str:
        with self._lock:
            self.calls += 1
            return self.script.pop(0) if self.script else self.mode

    def answer_for(self, user_msg: str, mode: str) -> str | None:
        _, genes, candidates = parse_user_msg(user_msg)
        labels = self.answers.get(user_msg, candidates)
        if mode == "wrong":
            labels = labels[1:] + labels[:1]
        elif mode == "empty":
            return ""
        elif mode == "null":
            return None
        elif mode == "garbage":
            return "I am not sure. Maybe the first one is a T cell?"
        return format_completion(f"Looked at {len(genes)} cells and their marker genes.", labels)

    def _handler_class(self):
        standin = self

        class Handler(QuietJSONHandler):  # its _send adds headers and survives clients that hang up
            protocol_version = "HTTP/1.1"

            def _send(self, status: int, body: dict, headers: Mapping[str, str] = {}) -> None:
                data = json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout) before we answered

            def do_POST(self):  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
                    return
                mode = standin._next_mode()
                with standin._lock:
                    standin.requests.append(body)
                    standin.inflight += 1
                    standin.max_inflight = max(standin.max_inflight, standin.inflight)
                try:
                    self._answer(body, mode)
                finally:
                    with standin._lock:
                        standin.inflight -= 1

            def _answer(self, body: dict, mode: str) -> None:
                if standin.delay_s:
                    time.sleep(standin.delay_s)
                if mode == "429":
                    self._send(429, {"error": {"message": "rate limited (stand-in)", "type": "rate_limit"}},
                               {"Retry-After": "0", "retry-after-ms": "1"})
                    return
                if mode == "500":
                    self._send(500, {"error": {"message": "internal error (stand-in)", "type": "server_error"}})
                    return
                if mode == "hang":
                    standin._stop.wait(standin.hang_s)
                    mode = "correct"
                user = next(m["content"] for m in body["messages"] if m["role"] == "user")
                content = standin.answer_for(user, mode)
                prompt_tokens = sum(len(m["content"].split()) for m in body["messages"])
                completion_tokens = len(content.split()) if content else 0
                self._send(200, {
                    "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": body.get("model", "standin"),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                              "total_tokens": prompt_tokens + completion_tokens},
                })

        return Handler

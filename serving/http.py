"""HTTP concerns in front of the model: bearer-token auth, the request body limit, and
Prometheus request metrics, as one ASGI middleware on KServe's FastAPI app."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time

TOKEN_ENV = "CELLPUZZLES_API_TOKEN"
# a child of KServe's logger: the server's lines share its handler, format and level (KSERVE_LOGLEVEL)
log = logging.getLogger("kserve.cellpuzzles")


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


MAX_JSON_DEPTH = 32  # a request is at most body -> instances -> instance -> cells -> cell -> genes deep
DISCONNECTED = "disconnected"  # the status label of requests whose client went away before the answer


class RequestGuard:
    """ASGI middleware in front of every route:

    - bearer-token auth (when CELLPUZZLES_API_TOKEN is set; GET health, readiness and metrics stay open);
    - the request head size (431), the body size (413), the time to send the body (408);
    - a body any route takes must be JSON the server can decode (400 naming why: syntax,
      invalid UTF-8 or a lone surrogate escape, nesting deeper than MAX_JSON_DEPTH, or a bad
      ``Inference-Header-Content-Length`` for KServe's binary V2 extension);
    - while the app works on a request: a client that disconnects has its work cancelled
      (the micro-batcher drops what is still queued), and a request past its server-side
      deadline is cancelled and answered 504;
    - Prometheus request metrics by route and status (``disconnected`` for clients that left).
    """

    def __init__(self, app, max_body_bytes: int, token: str | None, *, max_header_bytes: int | None = None,
                 body_timeout_s: float | None = None, request_timeout_s: float | None = None):
        self.app = app
        self.max_body = max_body_bytes
        self.token = token or None
        self.max_header_bytes = max_header_bytes
        self.body_timeout_s = body_timeout_s
        self.request_timeout_s = request_timeout_s
        self.m = metrics()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = route_label(scope["path"])
        t0 = time.perf_counter()
        state = {"status": None, "complete": False, "label": None}

        async def send_wrapped(msg):
            if msg["type"] == "http.response.start":
                state["status"] = msg["status"]
            elif msg["type"] == "http.response.body" and not msg.get("more_body"):
                state["complete"] = True
            await send(msg)

        def reply(status: int, message: str, param: str | None = None, close: bool = False):
            log.info("%s %s: %d %s", scope["method"], scope["path"], status, message)
            return _send_error(send_wrapped, route, status, message, param, close)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                return await reply(*refusal)
            if scope["method"] not in ("POST", "PUT", "PATCH"):
                return await self.app(scope, receive, send_wrapped)
            body, problem = await self._read_body(receive)
            if body is None:
                state["label"] = DISCONNECTED
                return None
            if problem is not None:
                return await reply(*problem)
            problem = _json_problem(body, dict(scope["headers"]))
            if problem is not None:
                return await reply(400, *problem)
            await self._run(scope, body, receive, send_wrapped, state)
        finally:
            label = state["label"] or str(state["status"] or 500)
            self.m.requests.labels(route, label).inc()
            self.m.latency.labels(route).observe(time.perf_counter() - t0)

    def _refusal(self, scope) -> tuple | None:
        headers = dict(scope["headers"])
        if self.max_header_bytes is not None:
            size = sum(len(k) + len(v) + 4 for k, v in scope["headers"]) + len(scope.get("raw_path") or b"")
            if size > self.max_header_bytes:
                return 431, (f"headers: {size} bytes is above the limit of {self.max_header_bytes} bytes "
                             "(--max-header-bytes)"), None, True
        protected = scope["method"] != "GET" or scope["path"].startswith("/openai/")
        if self.token and protected:
            got = headers.get(b"authorization", b"").decode("latin-1")
            if not (got.startswith("Bearer ") and hmac.compare_digest(got[7:].encode(), self.token.encode())):
                return 401, "authorization: missing or wrong bearer token; send 'Authorization: Bearer <token>'", None
        length = headers.get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                return 400, "content-length: not a number", None, True
            if n > self.max_body:
                return 413, (f"body: {n} bytes is above the limit of {self.max_body} bytes (--max-body-bytes); "
                             "send fewer or smaller instances"), None, True
        return None

    async def _read_body(self, receive) -> tuple[bytes | None, tuple | None]:
        """(body, None), (b"", (status, message, param, close)) or (None, None) when the client left."""
        chunks, size = [], 0
        loop = asyncio.get_running_loop()
        deadline = None if self.body_timeout_s is None else loop.time() + self.body_timeout_s
        while True:
            try:
                msg = await asyncio.wait_for(receive(), None if deadline is None else max(0.0, deadline - loop.time()))
            except TimeoutError:
                return b"", (408, f"body: not received within {self.body_timeout_s:g} s (--body-timeout-s)", None, True)
            if msg["type"] == "http.disconnect":
                return None, None
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return b"", (413, f"body: more than {self.max_body} bytes is above the limit (--max-body-bytes); send "
                                  "fewer or smaller instances", None, True)
            chunks.append(chunk)
            if not msg.get("more_body"):
                return b"".join(chunks), None

    async def _run(self, scope, body: bytes, receive, send, state: dict) -> None:
        """The app on the body read so far, cancelled when the client disconnects or the
        request's deadline passes (504)."""
        gone = asyncio.Event()
        replayed = {"done": False}

        async def app_receive():
            if not replayed["done"]:
                replayed["done"] = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def watch():
            while (await receive())["type"] != "http.disconnect":
                pass

        app = asyncio.ensure_future(self.app(scope, app_receive, send))
        watcher = asyncio.ensure_future(watch())
        try:
            done, _ = await asyncio.wait({app, watcher}, timeout=self.request_timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
            if watcher in done and app not in done and not state["complete"]:
                gone.set()
                app.cancel()
                await asyncio.gather(app, return_exceptions=True)
                state["label"] = DISCONNECTED
                log.info("%s %s: the client disconnected; its remaining work was dropped", scope["method"],
                         scope["path"])
                return
            if not done:
                app.cancel()
                await asyncio.gather(app, return_exceptions=True)
                if state["status"] is None:
                    log.warning("%s %s: past the deadline of %g s; its remaining work was dropped", scope["method"],
                                scope["path"], self.request_timeout_s)
                    await _send_error(send, route_label(scope["path"]), 504,
                                      f"deadline: no answer within {self.request_timeout_s:g} s "
                                      "(--request-timeout-s); send fewer or smaller instances", None, True)
                return
            await app  # finished (or raised: the error handlers outside deal with it)
        finally:
            watcher.cancel()
            if not app.done():
                app.cancel()


def _json_problem(body: bytes, headers: dict) -> tuple[str, str | None] | None:
    """Why a body is not JSON the server can decode (message, field), or None. An empty body
    is left to the route (some take none)."""
    import orjson

    head = body
    raw = headers.get(b"inference-header-content-length")
    if raw is not None:
        text = raw.decode("latin-1").strip()
        if not text.isdigit() or int(text) > len(body):
            return (f"inference-header-content-length: {text[:40]!r} is not a byte count within the body's "
                    f"{len(body)} bytes", "inference-header-content-length")
        head = body[:int(text)]
    if not head.strip():
        return None
    try:
        doc = orjson.loads(head)
    except orjson.JSONDecodeError as e:
        return f"body: not valid JSON ({e})", None
    depth, stack = 0, [(doc, 1)]
    while stack:
        x, d = stack.pop()
        depth = max(depth, d)
        if depth > MAX_JSON_DEPTH:
            return f"body: JSON nested deeper than {MAX_JSON_DEPTH} levels", None
        if isinstance(x, dict):
            stack += [(v, d + 1) for v in x.values()]
        elif isinstance(x, list):
            stack += [(v, d + 1) for v in x]
    return None


async def _send_error(send, route: str, status: int, message: str, param: str | None = None,
                      close: bool = False) -> None:
    """A JSON error: ``{"error": message}`` (KServe's shape), or OpenAI's error object on /openai routes."""
    if route.startswith("openai_"):
        payload = {"error": {"message": message, "type": "invalid_request_error" if status < 500 else "server_error",
                             "param": param, "code": None}}
    else:
        payload = {"error": message}
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def slow_client_protocol(header_timeout_s: float):
    """uvicorn's h11 protocol with a deadline for the request head: a client that opens a
    connection, or starts a request, and does not finish its headers within
    ``header_timeout_s`` gets 408 and the connection is closed (uvicorn itself only times out
    idle keep-alive connections). h11 also bounds a head that is still arriving
    (``h11_max_incomplete_event_size``); RequestGuard bounds a complete one (431)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class SlowClientProtocol(H11Protocol):
        _head_timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE:  # a request head still incomplete
                self._arm()
            else:
                self._disarm()

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(header_timeout_s, self._head_timeout)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            self._head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                log.info("a client did not finish its request headers within %g s (--header-timeout-s); "
                         "connection closed", header_timeout_s)
                body = json.dumps({"error": f"headers: not received within {header_timeout_s:g} s "
                                            "(--header-timeout-s)"}).encode()
                self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                     b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
                self.transport.close()

    return SlowClientProtocol

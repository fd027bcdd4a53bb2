"""HTTP concerns in front of the model: bearer-token auth, the request body limit, and
Prometheus request metrics, as one ASGI middleware on KServe's FastAPI app."""

from __future__ import annotations

import hmac
import json
import time

TOKEN_ENV = "CELLPUZZLES_API_TOKEN"


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


class RequestGuard:
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

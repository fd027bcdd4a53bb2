"""A local STAND-IN for the Kubeflow Pipelines v2beta1 REST API, for tests only.

No Kubeflow cluster can run on the test machines, so this small threaded
``http.server`` answers just the endpoints that ``kfp.Client`` 2.17 calls for
``cellpuzzles pipeline submit | schedule | schedules | unschedule``. Production talks to
the real KFP API server (``ml-pipeline``, or the Kubeflow central dashboard's
``/pipeline`` prefix); nothing here decides behaviour the real server would not.

Endpoints (paths and JSON field names as ``kfp_server_api`` sends and parses them):

* ``GET  /apis/v2beta1/healthz``            -> ``{"multi_user": false, ...}``
* ``GET  /apis/v2beta1/experiments``        (``filter``: EQUALS on ``display_name``; ``namespace``)
* ``POST /apis/v2beta1/experiments``
* ``POST /apis/v2beta1/runs``               (``pipeline_spec`` inline, ``runtime_config``)
* ``POST /apis/v2beta1/recurringruns``      (``trigger.cron_schedule.cron``, ``max_concurrency``, ``no_catchup``, ``mode``)
* ``GET  /apis/v2beta1/recurringruns``      (``experiment_id``, ``page_size`` / ``page_token`` paging)
* ``DELETE /apis/v2beta1/recurringruns/{id}``

Like the real server it answers int64 fields as strings (``"max_concurrency": "1"``),
errors as a google.rpc.Status-shaped JSON body, and rejects a recurring run whose cron
does not have 6 fields or a descriptor (the server parses it with ``robfig/cron`` v1).

``token``: when set, every request must carry ``Authorization: Bearer <token>`` or gets
401; with ``login_page=True`` it gets what an auth proxy in front of the Kubeflow
dashboard sends instead: a 302 to ``/dex/auth`` that answers an HTML login page. Every
request is recorded in ``requests`` (method, path, query, headers, body) so tests can
assert on what the client actually sent.
"""

from __future__ import annotations

import json
import threading
import uuid
from datetime import UTC, datetime
from urllib.parse import parse_qs, urlsplit

from helpers.local_http import LocalHTTPServer, QuietJSONHandler

API = "/apis/v2beta1"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class KfpApiStandin(LocalHTTPServer):
    def __init__(self, token: str | None = None, multi_user: bool = False, login_page: bool = False):
        self.token = token
        self.login_page = login_page
        self.multi_user = multi_user
        self.requests: list[dict] = []
        self.experiments: dict[str, dict] = {}
        self.runs: dict[str, dict] = {}
        self.recurring_runs: dict[str, dict] = {}  # insertion order = creation order
        self._lock = threading.Lock()
        self._serve(self._handler_class())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def calls(self, method: str, path: str) -> list[dict]:
        """Recorded requests with this method and path (path relative to /apis/v2beta1)."""
        return [r for r in self.requests if r["method"] == method and r["path"] == API + path]

    # ---- the API ----
    def _route(self, method: str, path: str, query: dict, body: dict) -> tuple[int, dict]:
        if method == "GET" and path == f"{API}/healthz":
            return 200, {"commit_sha": "standin", "tag_name": "2.5.0", "multi_user": self.multi_user}
        if path == f"{API}/experiments":
            if method == "POST":
                return self._create_experiment(body)
            if method == "GET":
                return self._list_experiments(query)
        if path == f"{API}/runs" and method == "POST":
            return self._create_run(body)
        if path == f"{API}/recurringruns":
            if method == "POST":
                return self._create_recurring_run(body)
            if method == "GET":
                return self._list_recurring_runs(query)
        if path.startswith(f"{API}/recurringruns/") and method == "DELETE":
            rid = path.rsplit("/", 1)[1]
            if self.recurring_runs.pop(rid, None) is None:
                return _error(404, 5, f"RecurringRun {rid} not found")
            return 200, {}
        return _error(404, 5, f"no route {method} {path} in the stand-in")

    def _create_experiment(self, body: dict) -> tuple[int, dict]:
        name = body.get("display_name") or ""
        if not name:
            return _error(400, 3, "Experiment name is empty")
        ns = body.get("namespace") or ""
        if any(e["display_name"] == name and e["namespace"] == ns for e in self.experiments.values()):
            return _error(409, 6, f"Experiment {name} already exists")
        exp = {"experiment_id": str(uuid.uuid4()), "display_name": name, "description": body.get("description") or "",
               "namespace": ns, "created_at": _now(), "storage_state": "AVAILABLE"}
        self.experiments[exp["experiment_id"]] = exp
        return 200, exp

    def _list_experiments(self, query: dict) -> tuple[int, dict]:
        items = list(self.experiments.values())
        if "namespace" in query:
            items = [e for e in items if e["namespace"] == query["namespace"]]
        if query.get("filter"):
            for pred in json.loads(query["filter"]).get("predicates", []):
                if pred.get("key") != "display_name" or pred.get("operation") not in ("EQUALS", 1):  # kfp sends the enum number
                    return _error(400, 3, f"filter not supported by the stand-in: {pred}")
                items = [e for e in items if e["display_name"] == pred.get("stringValue")]
        return 200, ({"experiments": items, "total_size": len(items)} if items else {})

    def _create_run(self, body: dict) -> tuple[int, dict]:
        if body.get("experiment_id") not in self.experiments:
            return _error(404, 5, f"Experiment {body.get('experiment_id')} not found")
        if not body.get("pipeline_spec") and not body.get("pipeline_version_reference"):
            return _error(400, 3, "Run has neither a pipeline spec nor a pipeline version")
        run = {**body, "run_id": str(uuid.uuid4()), "state": "PENDING", "created_at": _now(),
               "storage_state": "AVAILABLE"}
        self.runs[run["run_id"]] = run
        return 200, run

    def _create_recurring_run(self, body: dict) -> tuple[int, dict]:
        if body.get("experiment_id") not in self.experiments:
            return _error(404, 5, f"Experiment {body.get('experiment_id')} not found")
        cron = ((body.get("trigger") or {}).get("cron_schedule") or {}).get("cron")
        if cron is not None and not cron.startswith("@") and len(cron.split()) != 6:
            return _error(400, 3, f"Invalid cron expression {cron!r}: want 6 fields (seconds first)")
        concurrency = int(body.get("max_concurrency") or 1)
        if not 1 <= concurrency <= 10:
            return _error(400, 3, "max concurrency of a recurring run must be between 1 and 10")
        rr = {**body, "recurring_run_id": str(uuid.uuid4()), "max_concurrency": str(concurrency),
              "status": "ENABLED" if body.get("mode", "ENABLE") == "ENABLE" else "DISABLED",
              "created_at": _now(), "updated_at": _now()}
        self.recurring_runs[rr["recurring_run_id"]] = rr
        return 200, rr

    def _list_recurring_runs(self, query: dict) -> tuple[int, dict]:
        items = list(self.recurring_runs.values())
        if query.get("experiment_id"):
            items = [r for r in items if r["experiment_id"] == query["experiment_id"]]
        start = int(query.get("page_token") or 0)
        size = int(query.get("page_size") or 10)
        page = items[start:start + size]
        out: dict = {"recurringRuns": page, "total_size": len(items)}  # sic: the proto field is recurringRuns
        if start + size < len(items):
            out["next_page_token"] = str(start + size)
        return 200, (out if page else {})

    # ---- HTTP ----
    def _handler_class(self):
        standin = self

        class Handler(QuietJSONHandler):
            protocol_version = "HTTP/1.1"

            def _login(self, parts) -> None:
                if parts.path == "/dex/auth":
                    page = b"<html><body><form>Log in to Kubeflow</form></body></html>"
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html")
                else:
                    page = b""
                    self.send_response(302)
                    self.send_header("Location", "/dex/auth?client_id=kubeflow-oidc-authservice")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)

            def _handle(self, method: str) -> None:
                parts = urlsplit(self.path)
                query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else {}
                with standin._lock:
                    standin.requests.append({"method": method, "path": parts.path, "query": query,
                                             "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body})
                    if standin.token is not None and self.headers.get("Authorization") != f"Bearer {standin.token}":
                        if standin.login_page:
                            self._login(parts)
                            return
                        status, out = _error(401, 16, "Unauthenticated: no valid bearer token in Authorization")
                    else:
                        status, out = standin._route(method, parts.path, query, body)
                self._send(status, out)

            def do_GET(self):  # noqa: N802
                self._handle("GET")

            def do_POST(self):  # noqa: N802
                self._handle("POST")

            def do_DELETE(self):  # noqa: N802
                self._handle("DELETE")

        return Handler


def _error(status: int, code: int, message: str) -> tuple[int, dict]:
    return status, {"error": message, "code": code, "message": message, "details": []}

"""A local STAND-IN for the Kubernetes API, for tests only: no cluster can run here.

It serves just the InferenceService endpoints KServeClient calls (GET, POST, merge PATCH),
bumps metadata.generation, and reports Ready unless a test marks a storageUri as broken.
It checks the project's create/patch/wait/rollback logic and the requests it sends, not
KServe itself. Every request is recorded in ``requests`` as (method, path, content type).
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from helpers.local_http import LocalHTTPServer, QuietJSONHandler


def merge_patch(target: dict, patch: dict) -> dict:
    """RFC 7386 JSON merge patch."""
    out = dict(target)
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_patch(out[k], v)
        else:
            out[k] = v
    return out


class KubeStandIn(LocalHTTPServer):
    """InferenceService GET/POST/PATCH on 127.0.0.1; use as a context manager."""

    PREFIX = "/apis/serving.kserve.io/v1beta1/namespaces/"

    def __init__(self):
        self.objects: dict[tuple[str, str], dict] = {}
        self.broken: set[str] = set()  # storageUris that never become Ready
        self.requests: list[tuple[str, str, str]] = []
        self._serve(self._handler_class())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def kubeconfig(self, path: Path) -> Path:
        """A kubeconfig whose only context points at this stand-in."""
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "standin",
            "clusters": [{"name": "standin", "cluster": {"server": self.url}}],
            "users": [{"name": "u", "user": {"token": "test"}}],
            "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "u"}}]}))
        return path

    def _handler_class(self):
        outer = self

        class Handler(QuietJSONHandler):

            def _key(self):
                parts = self.path.split("?")[0].removeprefix(outer.PREFIX).split("/")
                return parts[0], parts[2] if len(parts) > 2 else None

            def _body(self):
                return json.loads(self.rfile.read(int(self.headers["Content-Length"])))

            def do_GET(self):  # noqa: N802
                outer.requests.append(("GET", self.path, ""))
                ns, name = self._key()
                obj = outer.objects.get((ns, name))
                if obj is None:
                    return self._send(404, {"kind": "Status", "reason": "NotFound", "code": 404})
                uri = obj["spec"]["predictor"]["model"]["storageUri"]
                ready = "False" if uri in outer.broken else "True"
                self._send(200, {**obj, "status": {"observedGeneration": obj["metadata"]["generation"],
                                                   "conditions": [{"type": "Ready", "status": ready}]}})

            def do_POST(self):  # noqa: N802
                outer.requests.append(("POST", self.path, self.headers["Content-Type"]))
                ns, _ = self._key()
                obj = self._body()
                obj["metadata"]["generation"] = 1
                outer.objects[(ns, obj["metadata"]["name"])] = obj
                self._send(201, obj)

            def do_PATCH(self):  # noqa: N802
                outer.requests.append(("PATCH", self.path, self.headers["Content-Type"]))
                ns, name = self._key()
                obj = merge_patch(outer.objects[(ns, name)], self._body())
                obj["metadata"]["generation"] += 1
                outer.objects[(ns, name)] = obj
                self._send(200, obj)

        return Handler

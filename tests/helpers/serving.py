"""Helpers for the serving tests: a real `cellpuzzles serve` / `serve-transformer` subprocess
on a free port, request bodies built from puzzles, plain-HTTP status and POST."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from helpers.net import free_port


def instance(p, mode: str | None = None, ids: bool = True) -> dict:
    """A request instance from a puzzle: structured context, ranked genes, shuffled candidates."""
    from cellpuzzles.task.puzzle import parse_context

    x = {"context": parse_context(p.context) or p.context,
         "cells": [{"id": f"c{i}", "genes": list(g)} if ids else {"genes": list(g)} for i, g in enumerate(p.genes)],
         "candidates": list(reversed(p.candidates))}
    if mode:
        x["mode"] = mode
    return x


class Server:
    """A real server subprocess (`cellpuzzles ARGS --port P`); traffic goes to 127.0.0.1."""

    def __init__(self, args: list[str], log: Path, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(env or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "cellpuzzles.cli", *args, "--port", str(self.port)],
                                     stdout=open(log, "w"), stderr=subprocess.STDOUT, env=full_env)

    def wait(self, path: str = "/v2/models/cellpuzzles/ready", timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            if status(self.url + path) == 200:
                return
            if time.time() > deadline:
                self.stop()
                raise RuntimeError(f"server not ready in {timeout}s:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def status(url: str, headers: dict | None = None) -> int | None:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def post(url: str, body, headers: dict | None = None, timeout: float = 120) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST",
                                 headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, {"raw": raw.decode(errors="replace")}


def metric(url: str, name: str, **labels) -> float:
    """The sum of a Prometheus series on the server's /metrics over the samples with these labels."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


class RawClient:
    """A deliberately bad HTTP client on a plain socket: sends what it is told, when it is told."""

    def __init__(self, port: int, timeout: float = 30):
        import socket

        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)

    def send(self, data: bytes) -> RawClient:
        self.sock.sendall(data)
        return self

    def post_head(self, path: str, length: int, extra: bytes = b"") -> RawClient:
        return self.send(b"POST %s HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n"
                         b"content-length: %d\r\n%s\r\n" % (path.encode(), length, extra))

    def response(self) -> tuple[int, bytes, bool]:
        """(status, body, closed): reads until the server closes the connection or the
        announced body is complete."""
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed before a response: {buf[:200]!r}")
            buf += chunk
        head, body = buf.split(b"\r\n\r\n", 1)
        status = int(head.split(b" ", 2)[1])
        length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")[1:]
                       if line.lower().startswith(b"content-length:")), None)
        while length is None or len(body) < length:  # no length: the body ends when the server closes
            chunk = self.sock.recv(65536)
            if not chunk:
                return status, body, True
            body += chunk
        try:
            closed = self.sock.recv(1) == b""
        except TimeoutError:
            closed = False
        return status, body, closed

    def close(self) -> None:
        self.sock.close()

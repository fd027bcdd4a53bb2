"""Helpers for the serving tests: a small real model folder from the bundled data, a real
`cellpuzzles serve` / `serve-transformer` subprocess on a free port, request bodies."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def build_world(root: Path, genes_per_cell: int = 8):
    """Bundled real PBMC data -> puzzles -> markers teacher traces -> an untrained tiny model."""
    from cellpuzzles.data.bundled import materialise
    from cellpuzzles.data.cells import CellsOptions, build_cells
    from cellpuzzles.data.sample import PuzzleOptions, make_splits
    from cellpuzzles.distill.traces import DistillOptions, distill, read_traces
    from cellpuzzles.distill.teachers.markers import MarkersTeacher
    from cellpuzzles.inference.folder import PromptOptions
    from cellpuzzles.train.tiny import TinyConfig, build_tiny

    cells = build_cells(materialise(root / "data"), CellsOptions(progress=False))
    splits, _ = make_splits(cells, PuzzleOptions(n_max=5, train_per_n=20, test_per_n=8, reasoning_fraction=0.5))
    distill(splits["reasoning"], MarkersTeacher(splits["train"] + splits["reasoning"]), DistillOptions(),
            root / "traces.jsonl")
    pairs = read_traces(root / "traces.jsonl")
    folder = build_tiny([p for p, _ in pairs], [t for _, t in pairs], root / "model", TinyConfig(**SMALL),
                        PromptOptions(genes_per_cell=genes_per_cell))
    return folder, splits


def instance(p, mode: str | None = None, ids: bool = True) -> dict:
    """A request instance from a puzzle: structured context, ranked genes, shuffled candidates."""
    from cellpuzzles.task.puzzle import parse_context

    x = {"context": parse_context(p.context) or p.context,
         "cells": [{"id": f"c{i}", "genes": list(g)} if ids else {"genes": list(g)} for i, g in enumerate(p.genes)],
         "candidates": list(reversed(p.candidates))}
    if mode:
        x["mode"] = mode
    return x


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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

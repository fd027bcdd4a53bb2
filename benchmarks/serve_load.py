"""Load on `cellpuzzles serve` with the tiny model: requests/s and p50/p99 latency at
concurrency 1, 8 and 32, and the throughput of micro-batching against one-at-a-time
decoding (the same server with --max-batch-size 1) at concurrency 16, measured in the
same run. Requests that fail or answer 5xx are counted (they must be 0).

    python benchmarks/serve_load.py [--model FOLDER] [--requests 64] [--mode constrained]

One instance per request, realistic puzzles from the bundled real PBMC data (test split).
Without --model, an untrained tiny model (project default size) is built from the bundled
data first (its speed is what is measured; its answers are not). The server binds 0.0.0.0;
traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from local_server import CellPuzzlesProcess  # noqa: E402


def build_model(root: Path):
    from cellpuzzles.data.bundled import materialise
    from cellpuzzles.data.cells import CellsOptions, build_cells
    from cellpuzzles.data.sample import PuzzleOptions, make_splits
    from cellpuzzles.distill.teachers.markers import MarkersTeacher
    from cellpuzzles.distill.traces import DistillOptions, distill, read_traces
    from cellpuzzles.inference.folder import PromptOptions
    from cellpuzzles.train.tiny import TinyConfig, build_tiny

    cells = build_cells(materialise(root / "data"), CellsOptions(progress=False))
    splits, _ = make_splits(cells, PuzzleOptions(n_min=3, n_max=8, train_per_n=40, test_per_n=20,
                                                 reasoning_fraction=0.5))
    distill(splits["reasoning"], MarkersTeacher(splits["train"] + splits["reasoning"]), DistillOptions(),
            root / "traces.jsonl")
    pairs = read_traces(root / "traces.jsonl")
    folder = build_tiny([p for p, _ in pairs], [t for _, t in pairs], root / "model", TinyConfig(),
                        PromptOptions(genes_per_cell=6))
    return folder, splits["test"]


def test_puzzles(root: Path):
    from cellpuzzles.data.bundled import materialise
    from cellpuzzles.data.cells import CellsOptions, build_cells
    from cellpuzzles.data.sample import PuzzleOptions, make_splits

    cells = build_cells(materialise(root / "data"), CellsOptions(progress=False))
    return make_splits(cells, PuzzleOptions(n_min=3, n_max=8, train_per_n=40, test_per_n=20,
                                            reasoning_fraction=0.5))[0]["test"]


def body(p, mode: str) -> bytes:
    from cellpuzzles.task.puzzle import parse_context

    inst = {"context": parse_context(p.context) or p.context, "candidates": list(reversed(p.candidates)),
            "cells": [{"id": cid, "genes": g} for cid, g in zip(p.cell_ids, p.genes)], "mode": mode}
    return json.dumps({"instances": [inst]}).encode()


def Server(model: Path, batch: int, wait_ms: float, log: Path) -> CellPuzzlesProcess:
    return CellPuzzlesProcess(["serve", "--model", str(model), "--max-batch-size", str(batch), "--max-wait-ms",
                               str(wait_ms)], log, ready="/v2/models/cellpuzzles/ready", timeout_s=180)


def load(url: str, bodies: list[bytes], concurrency: int) -> dict:
    """Send every body once with `concurrency` clients; latency per request, failures."""
    lat, failed, lock, it = [], [0], threading.Lock(), iter(bodies)
    target = url + "/v1/models/cellpuzzles:predict"

    def client():
        while True:
            with lock:
                b = next(it, None)
            if b is None:
                return
            t0 = time.perf_counter()
            try:
                req = urllib.request.Request(target, data=b, headers={"content-type": "application/json"})
                with urllib.request.urlopen(req, timeout=300) as r:
                    ok = r.status == 200 and len(json.loads(r.read())["predictions"]) == 1
            except (urllib.error.URLError, OSError, ValueError, KeyError):
                ok = False
            dt = time.perf_counter() - t0
            with lock:
                lat.append(dt)
                failed[0] += 0 if ok else 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms = np.array(lat) * 1000
    return {"concurrency": concurrency, "requests": len(lat), "rps": len(lat) / wall,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "failed": failed[0]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a model folder (default: build the tiny model)")
    ap.add_argument("--requests", type=int, default=64, help="requests per load level (concurrency 1 sends half)")
    ap.add_argument("--mode", choices=["constrained", "free"], default="constrained")
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=10.0)
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(min(4, os.cpu_count() or 1)))

    work = Path(tempfile.mkdtemp(prefix="serve_load."))
    t0 = time.time()
    if a.model:
        model, puzzles = Path(a.model), test_puzzles(work)
    else:
        model, puzzles = build_model(work)
    print(f"model {model} ({time.time() - t0:.0f} s to prepare); {len(puzzles)} test puzzles, "
          f"N {min(p.n for p in puzzles)}-{max(p.n for p in puzzles)}; mode {a.mode}; "
          f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}")
    bodies = [body(puzzles[i % len(puzzles)], a.mode) for i in range(a.requests)]

    rows = []
    server = Server(model, a.max_batch_size, a.max_wait_ms, work / "batched.log")
    try:
        load(server.url, bodies[:4], 4)  # warm-up
        for c in (1, 8, 32, 16):
            n = a.requests // 2 if c == 1 else a.requests
            rows.append({"server": f"batched (max {a.max_batch_size})", **load(server.url, bodies[:n], c)})
    finally:
        server.stop()
    server = Server(model, 1, 0, work / "single.log")
    try:
        load(server.url, bodies[:4], 4)
        rows.append({"server": "one-at-a-time (max 1)", **load(server.url, bodies, 16)})
    finally:
        server.stop()

    print(f"\n{'server':<24}{'conc':>5}{'reqs':>6}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'failed':>8}")
    for r in rows:
        print(f"{r['server']:<24}{r['concurrency']:>5}{r['requests']:>6}{r['rps']:>9.2f}{r['p50_ms']:>9.0f}"
              f"{r['p99_ms']:>9.0f}{r['failed']:>8}")
    batched16 = next(r for r in rows if r["concurrency"] == 16 and r["server"].startswith("batched"))
    single16 = rows[-1]
    ratio = batched16["rps"] / single16["rps"]
    lost = sum(r["failed"] for r in rows)
    print(f"\nbatched / one-at-a-time throughput at concurrency 16: {ratio:.2f}x (target >= 3x)")
    print(f"requests lost or answered with an error: {lost} (must be 0)")
    return 0 if lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

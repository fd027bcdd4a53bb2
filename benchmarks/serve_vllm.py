"""`cellpuzzles serve` against vLLM + `cellpuzzles serve-transformer` (the production topology),
constrained mode, the same requests, the same run: requests/s and p50/p99 latency at
concurrency 1 and 16, the ratio of the two, and how often their answers agree.

    python benchmarks/serve_vllm.py [--model FOLDER] [--requests 32]

Without --model, the pipeline's path is taken in miniature: bundled PBMC data -> puzzles ->
markers traces (scaffolds) -> the tiny model (project default size) -> a short SFT. vLLM runs
from its own venv (tests/helpers/vllm.py: $CELLPUZZLES_VLLM_VENV or .venv-vllm, built when
missing). All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the vLLM venv and server launcher the tests use

from helpers.vllm import VLLMServer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from local_server import CellPuzzlesProcess  # noqa: E402
from serve_load import build_model as untrained_model  # noqa: E402
from serve_load import test_puzzles  # noqa: E402

PREDICT = "/v1/models/cellpuzzles:predict"


def build_model(root: Path, steps: int):
    """serve_load.py's tiny model and test puzzles, after ``steps`` SFT steps on its traces."""
    from cellpuzzles.distill.traces import read_traces
    from cellpuzzles.train.sft import SFTOptions, sft

    init, test = untrained_model(root / "init")
    return sft(read_traces(root / "init" / "traces.jsonl"), init, root / "model", SFTOptions(max_steps=steps)), test


def Proc(args: list[str], log: Path, ready: str = "/v2/models/cellpuzzles/ready") -> CellPuzzlesProcess:
    """`cellpuzzles ARGS --port P`, with no API tokens."""
    return CellPuzzlesProcess(args, log, ready, env={"CELLPUZZLES_API_TOKEN": "", "CELLPUZZLES_PREDICTOR_TOKEN": ""})


def load(url: str, bodies: list[bytes], concurrency: int) -> tuple[dict, list]:
    """Every body once with `concurrency` clients: the figures and each request's answer."""
    lat, answers, failed, lock = [], [None] * len(bodies), [0], threading.Lock()
    todo = iter(range(len(bodies)))

    def client():
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            t0 = time.perf_counter()
            try:
                req = urllib.request.Request(url + PREDICT, data=bodies[i], headers={"content-type": "application/json"})
                with urllib.request.urlopen(req, timeout=600) as r:
                    pred = json.loads(r.read())["predictions"][0]
                answers[i] = pred["answer"] if pred.get("valid") else None
            except (OSError, ValueError, KeyError):
                pass
            with lock:
                lat.append(time.perf_counter() - t0)
                failed[0] += answers[i] is None

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms = np.array(lat) * 1000
    return ({"concurrency": concurrency, "requests": len(lat), "rps": len(lat) / wall,
             "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "failed": failed[0]},
            answers)


def main() -> int:
    from cellpuzzles.evaluation.endpoint import v1_instance

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a trained model folder (default: a short pipeline run)")
    ap.add_argument("--requests", type=int, default=32, help="requests per load level")
    ap.add_argument("--sft-steps", type=int, default=60, help="SFT steps when building the model")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="serve_vllm."))
    t0 = time.time()
    model, puzzles = (Path(a.model), test_puzzles(work)) if a.model else build_model(work, a.sft_steps)
    print(f"model {model} ({time.time() - t0:.0f} s to prepare); {len(puzzles)} test puzzles, "
          f"N {min(p.n for p in puzzles)}-{max(p.n for p in puzzles)}; constrained mode; {os.cpu_count()} CPUs")
    bodies = [json.dumps({"instances": [v1_instance(puzzles[i % len(puzzles)], "constrained")]}).encode()
              for i in range(a.requests)]

    rows, answers = [], {}
    vllm = VLLMServer(model, work / "vllm.log")
    try:
        serve = Proc(["serve", "--model", str(model)], work / "serve.log")
        vllm.wait()
        transformer = Proc(["serve-transformer", "--predictor-url", vllm.base, "--model-dir", str(model)],
                           work / "transformer.log")
        try:
            for name, url in (("cellpuzzles serve", serve.url), ("vLLM + transformer", transformer.url)):
                load(url, bodies[:2], 2)  # warm-up
                for c in (1, 16):
                    row, got = load(url, bodies, c)
                    rows.append({"server": name, **row})
                    answers[name, c] = got
        finally:
            transformer.stop()
            serve.stop()
    finally:
        vllm.stop()

    print(f"\n{'server':<22}{'conc':>5}{'reqs':>6}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'failed':>8}")
    for r in rows:
        print(f"{r['server']:<22}{r['concurrency']:>5}{r['requests']:>6}{r['rps']:>9.2f}{r['p50_ms']:>9.0f}"
              f"{r['p99_ms']:>9.0f}{r['failed']:>8}")
    for c in (1, 16):
        s, v = (next(r for r in rows if r["server"] == n and r["concurrency"] == c)
                for n in ("cellpuzzles serve", "vLLM + transformer"))
        print(f"concurrency {c}: vLLM + transformer / serve throughput {v['rps'] / s['rps']:.2f}x, "
              f"p50 {v['p50_ms'] / s['p50_ms']:.2f}x")
    same = sum(x == y and x is not None for x, y in zip(answers["cellpuzzles serve", 16],
                                                         answers["vLLM + transformer", 16]))
    print(f"answers identical: {same} / {len(bodies)}")
    return 0 if all(r["failed"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

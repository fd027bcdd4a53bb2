"""Fairness of `cellpuzzles serve`: the latency of small requests while a large one runs.

Eight clients send one-instance requests (constrained, the default mode) back to back while
one client has a large job of BIG instances (free mode, the costly text) decoded. Reported
per server configuration, all measured in this run on the same model and puzzles:

    baseline     limits and interleaving off (--no-interleave, no instance or token limit):
                 the large job is one request, queued first come, first served (the server before);
    interleave   interleaving on, limits off: the same single large request;
    default      the server's defaults: at most --max-instances per request, so the large job
                 goes as several requests of that size, sent one after another (what the 400 says to do);
    alone        (default server, no large job) small requests by themselves: the floor.

It prints p50/p99/max of the small requests, the large job's wall time, the time of one
maximal request under the defaults (max instances of the largest puzzles, free mode) alone,
and the ratio of the small requests' p99 baseline / default. A small request that waits past
--request-timeout-s gets 504 (counted apart: its latency is then the deadline).

    python benchmarks/serve_fairness.py [--model FOLDER] [--big 192] [--seconds-alone 10]

Without --model, an untrained tiny model of the project's default size is built from the
bundled data first (speed is what is measured, not answers). Traffic goes to 127.0.0.1.
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
from serve_load import body, build_model, test_puzzles  # noqa: E402  (the same model and puzzles)

OFF = ["--no-interleave", "--max-instances", "1000000", "--max-prompt-tokens", "1000000000",
       "--request-timeout-s", "100000"]


def Server(model: Path, args: list[str], log: Path) -> CellPuzzlesProcess:
    return CellPuzzlesProcess(["serve", "--model", str(model), *args], log)


def send(url: str, data: bytes, timeout: float = 3600) -> tuple[int, float]:
    t0 = time.perf_counter()
    req = urllib.request.Request(url + "/v1/models/cellpuzzles:predict", data=data,
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()
            code = r.status
    except urllib.error.HTTPError as e:
        code = e.code
    return code, time.perf_counter() - t0


def instances(puzzles, k: int, mode: str) -> list[dict]:
    return [json.loads(body(puzzles[i % len(puzzles)], mode))["instances"][0] for i in range(k)]


def small_load(url: str, smalls: list[bytes], until, clients: int = 8) -> dict:
    """`clients` threads send one-instance requests back to back until ``until()`` is true."""
    lat, errors, deadline, lock = [], [0], [0], threading.Lock()

    def client(k):
        i = k
        while not until():
            code, dt = send(url, smalls[i % len(smalls)])
            i += clients
            with lock:
                lat.append(dt)
                deadline[0] += code == 504  # the server's --request-timeout-s answered for it
                errors[0] += code not in (200, 504)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ms = np.array(lat) * 1000
    return {"small": len(lat), "p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)),
            "max": float(ms.max()), "errors": errors[0], "504": deadline[0]}


def with_big_job(url: str, smalls: list[bytes], big: list[dict], per_request: int) -> dict:
    """Small load while the large job (split into requests of ``per_request``) runs."""
    done, out = threading.Event(), {}

    def big_client():
        time.sleep(0.5)  # the small clients are running first
        t0 = time.perf_counter()
        codes = [send(url, json.dumps({"instances": big[s:s + per_request]}).encode())[0]
                 for s in range(0, len(big), per_request)]
        out["big_s"], out["big_codes"] = time.perf_counter() - t0, sorted(set(codes))
        done.set()

    t = threading.Thread(target=big_client)
    t.start()
    r = small_load(url, smalls, done.is_set)
    t.join()
    return {**r, **out}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a model folder (default: build the tiny model)")
    ap.add_argument("--big", type=int, default=192, help="instances in the large job")
    ap.add_argument("--seconds-alone", type=float, default=10.0, help="how long to measure small requests alone")
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(min(4, os.cpu_count() or 1)))
    from cellpuzzles.serving.options import ServeOptions

    limit = ServeOptions(model="").max_instances
    work = Path(tempfile.mkdtemp(prefix="serve_fairness."))
    model, puzzles = (Path(a.model), test_puzzles(work)) if a.model else build_model(work)
    smalls = [body(p, "constrained") for p in puzzles]
    big = instances(puzzles, a.big, "free")
    largest = sorted(puzzles, key=lambda p: -p.n)
    maximal = json.dumps({"instances": instances(largest, limit, "free")}).encode()
    print(f"model {model}; {len(puzzles)} test puzzles, N {min(p.n for p in puzzles)}-{largest[0].n}; large job "
          f"{a.big} free instances; 8 small clients; OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}", flush=True)

    rows = {}
    for name, args, per_request in (("baseline", OFF, a.big), ("interleave", OFF[1:], a.big),
                                    ("default", [], limit)):
        s = Server(model, args, work / f"{name}.log")
        try:
            send(s.url, smalls[0])  # warm-up
            if name == "default":
                code, rows["maximal_s"] = send(s.url, maximal)
                assert code == 200, code
                rows["alone"] = small_load(s.url, smalls, lambda end=time.time() + a.seconds_alone: time.time() > end)
            rows[name] = with_big_job(s.url, smalls, big, per_request)
            print(f"  {name}: done", flush=True)
        finally:
            s.stop()

    print(f"\n{'server':<12}{'small reqs':>11}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'large job s':>13}{'504':>6}"
          f"{'errors':>8}")
    for name in ("baseline", "interleave", "default", "alone"):
        r = rows[name]
        big_s = f"{r['big_s']:.1f}" if "big_s" in r else "-"
        print(f"{name:<12}{r['small']:>11}{r['p50']:>9.0f}{r['p99']:>9.0f}{r['max']:>9.0f}{big_s:>13}{r['504']:>6}"
              f"{r['errors']:>8}")
    ratio = rows["baseline"]["p99"] / rows["default"]["p99"]
    print(f"\nsmall-request p99 while the large job runs: baseline {rows['baseline']['p99']:.0f} ms, default "
          f"{rows['default']['p99']:.0f} ms: {ratio:.1f}x lower (alone: {rows['alone']['p99']:.0f} ms)")
    print(f"one maximal request under the defaults ({limit} instances of N={largest[0].n}, free mode) alone: "
          f"{rows['maximal_s']:.2f} s")
    errors = sum(rows[n]["errors"] for n in ("baseline", "interleave", "default", "alone"))
    print(f"small requests answered with an error other than the deadline's 504: {errors} (must be 0)")
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

"""What a reviewer sees in MLflow, as pictures: registers a model folder and its evaluation
(the output of `cellpuzzles run`: the RL model and its evaluation folder, whose baselines.json
holds the peers) as a version on a real `mlflow server` on 127.0.0.1, runs the gate, and takes
headless-Chromium screenshots of the model version page (the model card), the experiment's
runs and the logged model.

Needs a Chromium binary (Debian: `apt-get install chromium`; or set CHROMIUM=/path). Prints
the PNG paths and the figures on the card.

    python benchmarks/mlflow_screenshot.py --model runs/default/pipeline/JOB/rl/model \\
        --evaluation runs/default/pipeline/JOB/evaluate/evaluation --out docs/screenshots
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            sys.exit(f"error: mlflow server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    sys.exit(f"error: mlflow server at {url} not healthy after {timeout:.0f} s")


def shoot(chromium: str, url: str, png: Path, height: int) -> None:
    """A full-page-height screenshot after the single-page app has rendered (virtual time)."""
    subprocess.run([chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size=1500,{height}", "--virtual-time-budget=20000", f"--screenshot={png}", url],
                   check=True, capture_output=True, timeout=180)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a model folder the pipeline wrote (e.g. .../rl/model)")
    ap.add_argument("--evaluation", required=True, help="its evaluation folder (evaluation.json, baselines.json)")
    ap.add_argument("--out", default="docs/screenshots", help="folder for the PNGs")
    ap.add_argument("--name", default="cellpuzzles")
    ap.add_argument("--data-version", default="bundled", help="recorded on the version (data.dvc md5 in a run)")
    a = ap.parse_args()

    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        sys.exit("error: no chromium binary; install it (apt-get install chromium) or set CHROMIUM=/path")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="mlflow-shot."))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{work}/mlflow.db",
         "--artifacts-destination", str(work / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], stdout=open(work / "server.log", "w"), stderr=subprocess.STDOUT)
    try:
        wait_healthy(url, server)
        os.environ["MLFLOW_TRACKING_URI"] = url
        from cellpuzzles.release.gate import GateOptions, gate
        from cellpuzzles.release.registry import LOGGED_MODEL_TAG, client, register

        v = register(a.model, a.evaluation, name=a.name, data_version=a.data_version)
        d = gate(a.name, v, GateOptions())
        c = client(url)
        mv = c.get_model_version(a.name, v)
        exp = c.get_run(mv.run_id).info.experiment_id
        pages = {"model_version": (f"{url}/#/models/{a.name}/versions/{v}", 3000),
                 # the UI's workflow switch defaults to GenAI pages; the card's link asks for the runs
                 "experiment_runs": (f"{url}/#/experiments/{exp}?workflowType=machine_learning", 1100),
                 "logged_model": (f"{url}/#/experiments/{exp}/models/{mv.tags[LOGGED_MODEL_TAG]}", 1600)}
        for page, (link, height) in pages.items():
            png = out / f"mlflow_{page}.png"
            shoot(chromium, link, png, height)
            print(f"{page}: {png} ({png.stat().st_size // 1024} KiB) <- {link}")
        print(f"gate: {'PASS' if d.passed else 'FAIL'}; the card (version {v} description):\n")
        print(mv.description)
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

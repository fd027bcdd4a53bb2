"""The main job: the retraining pipeline (pipelines/retrain.py), executed locally with
kfp.local's SubprocessRunner — the same definition a Kubeflow cluster runs.

Task outputs go under ``OUT/pipeline/`` (one folder per pipeline run; kfp.local's cache
under ``OUT/pipeline/.kfp_cache`` lets a rerun reuse finished upstream steps), the full
task log to ``OUT/pipeline.log``; the terminal shows progress lines. ``OUT/summary.json``
is written last and names every output, the metrics and the gate decision.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cellpuzzles import __version__
from cellpuzzles.core import atomic
from cellpuzzles.core.errors import CellPuzzlesError
from cellpuzzles.core.provenance import provenance
from cellpuzzles.steps.common import FAILURE_ENV, PROGRESS_ENV

CACHEABLE = ("validate", "puzzles", "distill", "sft", "rl")
BASELINE_KEYS = ("n", "batch_accuracy", "batch_accuracy_ci", "cell_accuracy", "cell_accuracy_ci", "format_ratio",
                 "uniqueness", "ci_scheme")
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # kfp colours its error messages


@dataclass
class RunOptions:
    data: str | None = None  # None: the bundled real PBMC data, materialised into data/
    out: str = "runs/default"
    column_map: list[str] = field(default_factory=list)
    seed: int = 0
    params: dict = field(default_factory=dict)  # any other pipeline parameter (see pipelines/retrain.py)
    cache: bool = True  # reuse finished upstream steps of an earlier run into the same OUT


def code_fingerprint() -> str:
    """A hash of the code the steps run: the cellpuzzles package with its components and
    pipeline. kfp.local's cache key covers a step's inputs and image tag (the package
    version), not the code behind them, so this decides whether cached steps are still valid."""
    import hashlib
    import importlib

    h = hashlib.sha256()
    roots = []
    for name in ("cellpuzzles", "cellpuzzles.components", "cellpuzzles.pipelines", "cellpuzzles.serving"):
        for d in importlib.import_module(name).__path__:  # the last three install from the repository root
            if Path(d).resolve() not in roots:
                roots.append(Path(d).resolve())
    for root in roots:
        for f in sorted(root.rglob("*")):
            if f.is_file() and f.suffix in (".py", ".json", ".jinja", ".yaml") and "__pycache__" not in f.parts:
                h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def drop_stale_cache(root: Path, fingerprint: str) -> bool:
    """Forget kfp.local's cached steps under ``root`` when they were made by other code (or
    by code of unknown fingerprint); record the current fingerprint. True if dropped."""
    import shutil

    cache, mark = root / ".kfp_cache", root / ".code_fingerprint"
    known = mark.read_text().strip() if mark.is_file() else None
    dropped = cache.exists() and known != fingerprint
    if dropped:
        print(f"the code changed since the cached steps in {root} ran: running every step again", flush=True)
        shutil.rmtree(cache)
    atomic.write_text(mark, fingerprint + "\n")
    return dropped


class ProgressFollower(threading.Thread):
    """Shows the steps' progress events (JSON lines the steps append to ``path``, see
    ``cellpuzzles.steps.common.progress``) on the terminal while the pipeline runs."""

    MARKS = {"start": "  ▶ {step}", "done": "  ✓ {step}", "failed": "  ✗ {step}: {message}",
             "progress": "    {clock}  {message}"}

    def __init__(self, path: Path, term):
        super().__init__(name="progress", daemon=True)
        self.path, self.term, self.offset, self.stopping = path, term, 0, threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(0.2):
            self.drain()
        self.drain()

    def drain(self) -> None:
        if not self.path.is_file():
            return
        with open(self.path) as fh:
            fh.seek(self.offset)
            for line in iter(fh.readline, ""):
                if not line.endswith("\n"):  # a line still being written: read it next time
                    break
                self.offset += len(line.encode())
                e = json.loads(line)
                clock = time.strftime("%H:%M:%S", time.localtime(e["time"]))
                self.term.write(self.MARKS.get(e["event"], self.MARKS["progress"]).format(clock=clock, **e) + "\n")
        self.term.flush()

    def stop(self) -> None:
        self.stopping.set()
        self.join()


def pipeline_arguments(opt: RunOptions, mlflow_uri: str) -> dict:
    from cellpuzzles.pipelines.retrain import retrain_pipeline

    declared = retrain_pipeline.component_spec.inputs or {}
    args = {"data_source": opt.data or "bundled", "column_map": ",".join(opt.column_map), "seed": opt.seed,
            "repo_dir": os.getcwd(), "mlflow_uri": mlflow_uri, "kserve_apply": False,
            "artifact_store": "" if mlflow_uri.startswith("sqlite:") else os.environ.get("CELLPUZZLES_ARTIFACT_STORE", ""),
            **opt.params}
    unknown = sorted(set(args) - set(declared))
    if unknown:
        raise CellPuzzlesError(f"unknown pipeline parameter(s) {', '.join(unknown)}; "
                               f"known: {', '.join(sorted(declared))}")
    if opt.data and not Path(opt.data).is_file():
        raise CellPuzzlesError(f"--data {opt.data}: file not found; give an .h5ad file")
    if opt.data:
        args["data_source"] = str(Path(opt.data).resolve())
    return args


def run(opt: RunOptions) -> dict:
    import warnings

    import kfp.local

    from cellpuzzles.core.tracking import connect
    from cellpuzzles.pipelines.retrain import retrain_pipeline

    out = Path(opt.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").unlink(missing_ok=True)  # the completion marker is written last
    t0 = time.time()
    mlflow_uri = connect(out)  # a configured server that is down fails here, before any step runs
    args = pipeline_arguments(opt, mlflow_uri)
    root = out / "pipeline"
    root.mkdir(exist_ok=True)
    failure = root / "failure.txt"
    failure.unlink(missing_ok=True)
    events = root / "progress.jsonl"
    events.unlink(missing_ok=True)
    os.environ[FAILURE_ENV], os.environ[PROGRESS_ENV] = str(failure), str(events)
    before = {p.name for p in root.iterdir()}
    # the steps run in this Python environment, as intended, not in their images
    warnings.filterwarnings("ignore", message=".*non-Python base image.*")
    warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
    if opt.cache:
        drop_stale_cache(root, code_fingerprint())
    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(root),
                   enable_caching=opt.cache, workspace_root=str(out / "kfp-workspace"))
    print(f"running the retraining pipeline with kfp.local (task log: {out / 'pipeline.log'})", flush=True)
    follower = ProgressFollower(events, sys.stdout)
    follower.start()
    real_stdout = sys.stdout
    try:
        with open(out / "pipeline.log", "a") as log:
            sys.stdout = log  # kfp's own lines and every task's output go to the task log
            try:
                retrain_pipeline(**args)
            finally:
                sys.stdout.flush()
                sys.stdout = real_stdout
                follower.stop()
    except RuntimeError as e:
        failed = failure.read_text().strip().splitlines() if failure.is_file() else []
        step, _, reason = failed[-1].partition(": ") if failed else ("?", "", ANSI.sub("", str(e)))
        raise CellPuzzlesError(f"pipeline failed at step {step}: {reason} (full log: {out / 'pipeline.log'})") from None
    finally:
        os.environ.pop(FAILURE_ENV, None)
        os.environ.pop(PROGRESS_ENV, None)
    jobs = sorted({p.name for p in root.iterdir() if p.is_dir()} - before - {".kfp_cache"})
    if not jobs:
        raise CellPuzzlesError(f"the pipeline finished but wrote no run folder under {root}")
    summary = collect_summary(root / jobs[-1], opt, args, mlflow_uri, time.time() - t0)
    atomic.write_json(out / "summary.json", summary)
    print_result(summary, out)
    return summary


def _find(job: Path, task: str, output: str, reused: bool = False) -> Path | None:
    """A task's output in this run's folder; for a step reused from the cache, the newest
    earlier run's (the cache serves the latest successful output)."""
    hits = sorted(job.glob(f"**/{task}/{output}"))
    if not hits and reused:
        hits = sorted(job.parent.glob(f"*/**/{task}/{output}"), key=lambda p: p.stat().st_mtime)[-1:]
    return hits[0] if hits else None


def collect_summary(job: Path, opt: RunOptions, args: dict, mlflow_uri: str, seconds: float) -> dict:
    from cellpuzzles.evaluation.compare import paired_difference
    from cellpuzzles.evaluation.record import read_evaluation

    records = {}  # model name ("sft", the RL algorithm) -> (folder, evaluation record)
    for f in sorted(job.glob("**/evaluation/evaluation.json")):
        rec = read_evaluation(f.parent)
        records[rec["model"]] = (f.parent, rec)
    algo = args.get("rl_algo", "grpo")
    ev_dir, record = records.get(algo, (None, {"modes": {}}))
    rl_vs_sft = {}
    if algo in records and "sft" in records:
        sft = records["sft"][1]
        rl_vs_sft = {m: paired_difference(record, sft, m) for m in record["modes"] if m in sft["modes"]}
    decision_file = _find(job, "gate", "decision")
    decision = json.loads(decision_file.read_text()) if decision_file else None
    manifest = _find(job, "deploy", "manifest")
    report = _find(job, "gate", "report")
    docs = _find(job, "validate", "validation", reused=True)
    baselines = ev_dir / "baselines.json" if ev_dir else None
    outputs = json.loads((job / "register" / "executor_output.json").read_text()) \
        if (job / "register" / "executor_output.json").is_file() else {}
    return {
        "version": __version__,
        "options": asdict(opt),
        "pipeline": {"job": job.name, "folder": str(job), "arguments": args},
        "models": {name: {m: r["metrics"] for m, r in rec["modes"].items()} for name, (_, rec) in records.items()},
        "rl_vs_sft": rl_vs_sft,  # paired on the same test puzzles: batch accuracy of RL minus SFT
        # random, markers, the classical peer (alone, one-to-one) and the input ceiling, same test puzzles
        "baselines": {k: {kk: v[kk] for kk in BASELINE_KEYS if kk in v}
                      for k, v in json.loads(baselines.read_text()).items()} if baselines and baselines.is_file() else {},
        "evaluation": str(ev_dir) if ev_dir else None,
        "reused_steps": [s for s in CACHEABLE if not (job / s).is_dir()],  # kfp.local cache hits
        "registered_version": (outputs.get("parameterValues") or {}).get("Output"),
        "gate": decision,
        "manifest": str(manifest) if manifest else None,
        "gate_report": str(report) if report else None,
        "data_docs": str(docs / "data_docs" / "index.html") if docs else None,
        "mlflow": {"tracking_uri": mlflow_uri},
        "wall_seconds": round(seconds, 1),
        "seed": opt.seed,
        "provenance": provenance(Path(__file__).resolve().parents[1]),  # the code that ran: this checkout
    }


def print_result(s: dict, out: Path) -> None:
    from cellpuzzles.task.reward import format_table

    if s["reused_steps"]:
        print(f"reused from an earlier run (kfp cache): {', '.join(s['reused_steps'])}")
    rows = {f"{name}/{mode}": m for name, modes in s["models"].items() for mode, m in modes.items()}
    # beside the tools an analyst would use instead and the ceiling of the model's input (same test puzzles)
    rows.update({name: m for name, m in s.get("baselines", {}).items() if {"n", "format_ratio", "uniqueness"} <= set(m)})
    if rows:
        print("\n" + format_table(rows))
    for mode, d in s.get("rl_vs_sft", {}).items():
        print(f"RL vs SFT ({mode}): {d['after']:.3f} vs {d['before']:.3f}, paired difference "
              f"{d['difference']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] on {d['n']} puzzles")
    gate = s["gate"]
    if gate:
        ev, o = gate.get("evidence") or {}, gate.get("options") or {}
        why = "; ".join(gate["reasons"]) or (
            f"batch accuracy {ev.get('batch_accuracy')} >= {o.get('min_batch_accuracy')}, format ratio "
            f"{ev.get('format_ratio')} >= {o.get('min_format_ratio')}, "
            + (f"not worse than champion v{ev['champion_version']}" if ev.get("champion_version") else "no champion yet"))
        print(f"\ngate: {gate['decision'].upper()} for {gate['model']} version {gate['version']} ({why})")
    uri = s["mlflow"]["tracking_uri"]
    ui = f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite:") else uri
    print(f"\ndone in {s['wall_seconds']}s. outputs in {out}/:\n"
          f"  summary.json      metrics, gate decision and every output's path\n"
          f"  pipeline/{s['pipeline']['job']}/   each step's outputs (validation data docs, puzzles, models, evaluation)\n"
          f"  pipeline.log      the full task log\n"
          + (f"  gate report       {s['gate_report']}\n" if s.get("gate_report") else "")
          + (f"  data docs         {s['data_docs']}\n" if s.get("data_docs") else "")
          + (f"  manifest          {s['manifest']}\n                    apply with: kubectl apply -f {s['manifest']}\n"
             if s["manifest"] else "  manifest          none (the gate did not pass)\n")
          + f"  MLflow            {ui}")

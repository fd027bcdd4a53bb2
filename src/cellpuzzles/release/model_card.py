"""What a reviewer reads on the model version page: a markdown model card (the version's
description), and the comparison it and the gate report share.

The card says the decision and its evidence, places the version beside the champion, the
classical peer (logistic regression on expression, one-to-one), the ceiling of the model's own
input, the marker solver and random — overall with 95% intervals and by N — and names the data
version, the lineage and how to serve the version. It is written at registration ("pending
gate") and rewritten by the gate with its decision.
"""

from __future__ import annotations

import json

from cellpuzzles.evaluation.peers import PEER, ceiling_for, describe

# one served instance (serving/protocol.py documents the request; this is its example)
INPUT_EXAMPLE = {
    "context": {"sex": "female", "tissue": "blood", "disease": "normal"},
    "cells": [{"id": "c1", "genes": ["CD3D", "IL7R", "LTB", "CD3E", "TRAC", "IL32"]},
              {"id": "c2", "genes": ["MS4A1", "CD79A", "CD74", "HLA-DRA", "CD79B", "BANK1"]}],
    "candidates": ["B cell", "T cell"],
    "mode": "constrained",
}
OUTPUT_EXAMPLE = {"answer": ["T cell", "B cell"], "valid": True, "reasoning": "<think>...</think>",
                  "completion": "<think>...</think>\n<answer>T cell | B cell</answer>", "mode": "constrained"}


def _line(m: dict) -> dict:
    return {k: m.get(k) for k in ("batch_accuracy", "batch_accuracy_ci", "cell_accuracy", "cell_accuracy_ci")}


def comparison(challenger: dict, champion: dict | None, mode: str, genes_shown: int | None) -> dict:
    """Rows (overall) and per-N batch accuracy for challenger, champion and the baselines the
    puzzles step scored on the same test puzzles (the record's ``baselines``)."""
    base = challenger.get("baselines") or {}
    ceiling = ceiling_for(base, genes_shown)
    named = {"challenger": challenger["modes"].get(mode),
             "champion": champion["modes"].get(mode) if champion else None,
             "classical peer": base.get(PEER), "input ceiling": base.get(ceiling) if ceiling else None,
             "markers": base.get("markers"), "random": base.get("random")}
    rows, by_n = {}, {}
    for k, v in named.items():
        if not v:
            continue
        rows[k] = _line(v.get("metrics", v))
        for n, m in (v.get("by_n") or {}).items():
            by_n.setdefault(str(n), {})[k] = m.get("batch_accuracy")
    keys = {"input ceiling": ceiling, "classical peer": PEER}
    return {"rows": rows, "by_n": dict(sorted(by_n.items(), key=lambda kv: int(kv[0]))),
            "names": {k: keys.get(k) or k for k in rows}}


def _iv(m: dict, k: str) -> str:
    v, ci = m.get(k), m.get(f"{k}_ci")
    return "—" if v is None else f"{v:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def comparison_markdown(comp: dict | None, title: str = "## Compared to what") -> list[str]:
    """The comparison as two markdown tables: overall with intervals, and batch accuracy by N."""
    if not comp or not comp.get("rows"):
        return []
    rows, names = comp["rows"], comp["names"]
    out = ["", title, "", "| solver | batch accuracy (95% CI) | cell accuracy (95% CI) |", "|---|---|---|"]
    for k, m in rows.items():
        label = f"**{k}**" if k == "challenger" else k if k == "champion" else f"{k}: {describe(names[k])}"
        out.append(f"| {label} | {_iv(m, 'batch_accuracy')} | {_iv(m, 'cell_accuracy')} |")
    cols = list(rows)
    out += ["", "Batch accuracy by N (cells per puzzle):", "", "| N | " + " | ".join(cols) + " |",
            "|---|" + "---|" * len(cols)]
    for n, r in comp["by_n"].items():
        out.append(f"| {n} | " + " | ".join("—" if r.get(c) is None else f"{r[c]:.3f}" for c in cols) + " |")
    return out + [""]


def model_card(name: str, version: str, record: dict, tags: dict, mode: str = "constrained",
               decision: dict | None = None, champion: dict | None = None, genes_shown: int | None = None,
               runs_url: str | None = None) -> str:
    """The version's description. ``decision``: {"passed", "reasons", "evidence"} from the gate
    (None: not gated yet); ``champion``: the champion's evaluation record it was compared with."""
    m = record["modes"].get(mode, {}).get("metrics", {})
    lines = [f"# {name} version {version}", ""]
    if decision is None:
        lines.append(f"**Decision: pending** — registered as `challenger`; the gate has not run. "
                     f"Batch accuracy ({mode} decoding) {_iv(m, 'batch_accuracy')}.")
    else:
        ev = decision.get("evidence") or {}
        verdict = "PASS — promoted to `champion`" if decision["passed"] else "FAIL — not promoted"
        lines.append(f"**Decision: {verdict}.**")
        lines += [f"- {r}" for r in decision.get("reasons") or []]
        if "delta" in ev:
            lines.append(f"- against champion v{ev.get('champion_version')}: paired difference in batch accuracy "
                         f"{ev['delta']:+.3f} [{ev['ci_low']:+.3f}, {ev['ci_high']:+.3f}] over {ev.get('n_paired')} "
                         f"test puzzles (resampling test {ev.get('resampled', 'puzzles')}); required lower bound "
                         f">= {ev['required_ci_low']:+.3f}")
        elif not decision.get("reasons"):
            lines.append("- no champion before it: passed on the floors")
    scheme = m.get("ci_scheme", "puzzles")
    lines += comparison_markdown(
        comparison(record, champion, mode, genes_shown),
        f"## Compared to what ({mode} decoding; {record.get('n_puzzles')} test puzzles; 95% intervals resampling "
        f"test {scheme})")
    rl = {k.removeprefix("rl_vs_sft."): v for k, v in tags.items() if k.startswith("rl_vs_sft.")}
    if rl:
        lines += ["RL vs its SFT model (paired difference in batch accuracy): "
                  + "; ".join(f"{k} {v}" for k, v in sorted(rl.items())), ""]
    steps = {k.removeprefix("step.").removesuffix(".run_id"): v for k, v in tags.items()
             if k.startswith("step.") and k.endswith(".run_id")}
    config = {k.removeprefix("config."): v for k, v in tags.items() if k.startswith("config.")}
    lines += ["## Data and lineage", "",
              f"- data version: `{tags.get('data_version', 'not recorded')}`",
              f"- test set: `{str(record.get('test_sha256'))[:16]}` ({record.get('n_puzzles')} puzzles; "
              f"the puzzle splits are this run's MLflow dataset inputs)",
              f"- code: `{tags.get('code_version', 'not recorded')}`"
              + (f"; pipeline run `{tags['kfp.job_name']}`" if tags.get("kfp.job_name") else "")]
    if config:
        lines.append("- training: " + ", ".join(f"{k} `{v}`" for k, v in sorted(config.items())))
    if genes_shown is not None:
        lines.append(f"- the prompt shows {genes_shown} genes per cell")
    if steps:
        lines.append("- step runs: " + ", ".join(f"{k} `{v}`" for k, v in sorted(steps.items())))
    if runs_url:
        lines.append(f"- the experiment's runs: [{runs_url}]({runs_url})")
    lines += ["", "## How to serve it", "",
              f"- on Kubeflow/KServe: `cellpuzzles deploy --name {name} --version {version} --apply` "
              "(renders and applies the InferenceService; without `--apply`, the manifest only)",
              f"- locally: `cellpuzzles serve --model models:/{name}/{version}` then POST to "
              "`/v1/models/cellpuzzles:predict`:", "",
              "```json", json.dumps({"instances": [INPUT_EXAMPLE]}, indent=1), "```", ""]
    return "\n".join(lines)

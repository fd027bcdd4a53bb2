"""PNG plots for MLflow: training curves, accuracy by N, confusion between types."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from cellpuzzles.task.puzzle import Puzzle, extract_answer, is_well_formed, split_labels


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curves(history: Sequence[dict], keys: Sequence[str], path: str | os.PathLike, title: str) -> bool:
    """One panel per key found in the history (e.g. reward, kl). False when none is."""
    found = [k for k in keys if any(k in h for h in history)]
    if not found:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(found), figsize=(4 * len(found), 3), squeeze=False)
    for ax, k in zip(axes[0], found):
        pts = [(h["step"], h[k]) for h in history if k in h]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".")
        ax.set_title(k)
        ax.set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def accuracy_by_n(results: dict[str, dict], path: str | os.PathLike) -> None:
    """Batch accuracy per puzzle size for each named result."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, r in results.items():
        by_n = {int(n): v for n, v in r["by_n"].items()}  # int keys in memory, str after a JSON round trip
        ns = sorted(by_n)
        ax.plot(ns, [by_n[n]["batch_accuracy"] for n in ns], marker="o", label=name)
    ax.set_xlabel("cells per puzzle (N)")
    ax.set_ylabel("batch accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def confusion(puzzles: Sequence[Puzzle], completions: Sequence[str], path: str | os.PathLike) -> None:
    """Row-normalised confusion (gold type -> predicted type) over well-formed predictions."""
    types = sorted({t for p in puzzles for t in p.candidates})
    index = {t.lower(): i for i, t in enumerate(types)}
    m = np.zeros((len(types), len(types)))
    for p, c in zip(puzzles, completions):
        if not is_well_formed(c):
            continue
        for g, pred in zip(p.answer, split_labels(extract_answer(c) or "")):
            if pred.lower() in index:
                m[index[g.lower()], index[pred.lower()]] += 1
    m = m / np.maximum(m.sum(1, keepdims=True), 1)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1 + 0.45 * len(types), 1 + 0.45 * len(types)))
    ax.imshow(m, vmin=0, vmax=1, cmap="Blues")
    ax.set_xticks(range(len(types)), types, rotation=90, fontsize=6)
    ax.set_yticks(range(len(types)), types, fontsize=6)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

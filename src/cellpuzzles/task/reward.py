"""The Cell-o1 batch-level reward and the evaluation metrics: one definition for RL,
evaluation, the promotion gate and serving.

Reward (per completion, against the gold answer string "A | B | C"):
  -1 if the format rule fails, the label count differs from the gold count, or labels repeat;
  otherwise (cell accuracy + exact match) / 2, labels compared case-insensitively after stripping.

Metrics (averaged over every prediction, as the reference evaluator does):
  cell_accuracy  correct cells / gold cells (micro); an ill-formed prediction has 0 correct cells
                 but its gold cells still count; a well-formed one is compared position by
                 position over the shorter of the two lists;
  batch_accuracy exact match of the whole list;
  format_ratio   share of well-formed completions;
  uniqueness     distinct labels / labels (0 for an ill-formed completion);
  length         completion length in characters.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cellpuzzles.task.puzzle import extract_answer, is_well_formed, split_labels


def _norm(labels: Sequence[str]) -> list[str]:
    return [x.strip().lower() for x in labels]


def batch_reward(completion: str, answer: str) -> float:
    """The Cell-o1 reward of one completion against the gold answer string."""
    if not is_well_formed(completion):
        return -1.0
    pred = _norm(split_labels(extract_answer(completion) or ""))
    gold = _norm(split_labels(answer))
    if len(pred) != len(gold) or len(set(pred)) != len(pred):
        return -1.0
    correct = sum(p == g for p, g in zip(pred, gold))
    cell_acc = correct / len(gold)
    exact = float(pred == gold)
    return (cell_acc + exact) / 2.0


def judge(completion: str, answer: str) -> dict:
    """Per-prediction quantities the metrics average over."""
    gold = _norm(split_labels(answer))
    ok = is_well_formed(completion)
    row = {"n": len(gold), "gold_cells": len(gold), "well_formed": ok, "length": len(completion)}
    if not ok:
        row.update(correct=0, exact=False, uniqueness=0.0)
        return row
    pred = _norm(split_labels(extract_answer(completion) or ""))
    row["correct"] = sum(p == g for p, g in zip(pred, gold))
    row["exact"] = pred == gold
    row["uniqueness"] = len(set(pred)) / len(pred) if pred else 0.0
    return row


def _metrics(correct, gold, exact, ok, uniq, length) -> dict[str, float]:
    """Metric values; each argument has a leading axis of predictions (and optional bootstrap axis)."""
    return {
        "cell_accuracy": correct.sum(-1) / gold.sum(-1),
        "batch_accuracy": exact.mean(-1),
        "format_ratio": ok.mean(-1),
        "uniqueness": uniq.mean(-1),
        "length": length.mean(-1),
    }


def _summarise(rows: list[dict], n_boot: int, seed: int) -> dict:
    cols = {k: np.asarray([r[k] for r in rows], dtype=float)
            for k in ("correct", "gold_cells", "exact", "well_formed", "uniqueness", "length")}
    args = (cols["correct"], cols["gold_cells"], cols["exact"], cols["well_formed"], cols["uniqueness"], cols["length"])
    point = {k: float(v) for k, v in _metrics(*args).items()}
    out: dict = {"n": len(rows), **point}
    if n_boot > 0 and len(rows) > 0:
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, len(rows), size=(n_boot, len(rows)))
        boot = _metrics(*(a[idx] for a in args))
        for k, v in boot.items():
            lo, hi = np.percentile(v, [2.5, 97.5])
            out[f"{k}_ci"] = [float(lo), float(hi)]
    return out


def score(
    completions: Sequence[str],
    answers: Sequence[str],
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """Metrics over all predictions with 95% bootstrap intervals (resampling puzzles), plus
    the same per puzzle size N under ``by_n``. Also the mean reward."""
    if len(completions) != len(answers):
        raise ValueError(f"{len(completions)} completions but {len(answers)} answers")
    if not completions:
        raise ValueError("nothing to score: no predictions")
    rows = [judge(c, a) for c, a in zip(completions, answers)]
    out = _summarise(rows, n_boot, seed)
    out["reward"] = float(np.mean([batch_reward(c, a) for c, a in zip(completions, answers)]))
    by_n: dict[int, list[dict]] = {}
    for r in rows:
        by_n.setdefault(r["n"], []).append(r)
    out["by_n"] = {int(n): _summarise(rs, n_boot, seed) for n, rs in sorted(by_n.items())}
    return out


def format_table(results: dict[str, dict]) -> str:
    """A plain-text table: one row per named result (overall), with 95% intervals."""
    head = f"{'model':<22}{'n':>6}  {'batch acc':<22}{'cell acc':<22}{'format':>8}{'unique':>8}"
    lines = [head, "-" * len(head)]
    for name, s in results.items():
        def iv(k, s=s):
            ci = s.get(f"{k}_ci")
            return f"{s[k]:.3f}" + (f" [{ci[0]:.3f},{ci[1]:.3f}]" if ci else "")
        lines.append(f"{name:<22}{s['n']:>6}  {iv('batch_accuracy'):<22}{iv('cell_accuracy'):<22}"
                     f"{s['format_ratio']:>8.3f}{s['uniqueness']:>8.3f}")
    return "\n".join(lines)


def format_by_n(s: dict) -> str:
    head = f"{'N':>4}{'puzzles':>9}{'batch acc':>11}{'cell acc':>10}{'format':>8}"
    lines = [head]
    for n, r in s["by_n"].items():
        lines.append(f"{n:>4}{r['n']:>9}{r['batch_accuracy']:>11.3f}{r['cell_accuracy']:>10.3f}{r['format_ratio']:>8.3f}")
    return "\n".join(lines)

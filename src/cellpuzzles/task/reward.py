"""The Cell-o1 batch-level reward and the evaluation metrics: one definition for RL,
evaluation, the promotion gate and serving.

Reward (per completion, against the gold answer string "A | B | C"):
  -1 if the format rule fails, the label count differs from the gold count, or labels repeat;
  otherwise (cell accuracy + exact match) / 2, labels compared case-insensitively after stripping.

Metrics (averaged over every prediction, as the reference evaluator does; intervals from
bootstrap weights, by default resampling predictions, or any [n_boot, predictions] weights the
caller passes, e.g. evaluation.compare.cell_weights, which resample test cells):
  cell_accuracy  correct cells / gold cells (micro); an ill-formed prediction has 0 correct cells
                 but its gold cells still count; a well-formed one is compared position by
                 position over the shorter of the two lists;
  batch_accuracy exact match as the reference evaluator counts it: a well-formed prediction whose
                 position-by-position comparison (over the shorter list) gets every gold cell right,
                 correct == len(gold), also when the prediction has extra labels after them;
  batch_accuracy_strict  the prediction is exactly the gold list (same length, same labels, in order);
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
        row.update(correct=0, exact=False, exact_strict=False, uniqueness=0.0)
        return row
    pred = _norm(split_labels(extract_answer(completion) or ""))
    row["correct"] = sum(p == g for p, g in zip(pred, gold))
    row["exact"] = row["correct"] == len(gold)  # the reference evaluator's rule (extra labels allowed)
    row["exact_strict"] = pred == gold
    row["uniqueness"] = len(set(pred)) / len(pred) if pred else 0.0
    return row


COLUMNS = ("correct", "gold_cells", "exact", "exact_strict", "well_formed", "uniqueness", "length")


def _metrics(w: np.ndarray, correct, gold, exact, strict, ok, uniq, length) -> dict[str, np.ndarray]:
    """Weighted metric values: ``w`` is [..., predictions] (ones for the point estimate, one row
    per bootstrap draw for intervals); the other arguments are [predictions]."""
    tot = w.sum(-1)
    return {
        "cell_accuracy": (w @ correct) / (w @ gold),
        "batch_accuracy": (w @ exact) / tot,
        "batch_accuracy_strict": (w @ strict) / tot,
        "format_ratio": (w @ ok) / tot,
        "uniqueness": (w @ uniq) / tot,
        "length": (w @ length) / tot,
    }


def puzzle_weights(n: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, n] multiplicities of a plain bootstrap over predictions (puzzles)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(float)


def _summarise(rows: list[dict], weights: np.ndarray | None) -> dict:
    cols = [np.asarray([r[k] for r in rows], dtype=float) for k in COLUMNS]
    point = {k: float(v) for k, v in _metrics(np.ones(len(rows)), *cols).items()}
    out: dict = {"n": len(rows), **point}
    if weights is not None and len(rows) > 0:
        with np.errstate(invalid="ignore", divide="ignore"):
            boot = _metrics(weights, *cols)
        for k, v in boot.items():
            v = v[np.isfinite(v)]
            if k != "length":  # shares: weights that resample cells are linearised and may overshoot [0, 1]
                v = np.clip(v, 0.0, 1.0)
            if len(v):
                lo, hi = np.percentile(v, [2.5, 97.5])
                out[f"{k}_ci"] = [float(lo), float(hi)]
    return out


def score(
    completions: Sequence[str],
    answers: Sequence[str],
    n_boot: int = 1000,
    seed: int = 0,
    weights: np.ndarray | None = None,
    scheme: str = "puzzles",
) -> dict:
    """Metrics over all predictions with 95% bootstrap intervals, plus the same per puzzle size
    N under ``by_n``, and the mean reward. ``weights`` ([draws, predictions]) replaces the plain
    bootstrap over predictions; ``scheme`` names what it resamples (recorded as ``ci_scheme``)."""
    if len(completions) != len(answers):
        raise ValueError(f"{len(completions)} completions but {len(answers)} answers")
    if not completions:
        raise ValueError("nothing to score: no predictions")
    if weights is None and n_boot > 0:
        weights, scheme = puzzle_weights(len(completions), n_boot, seed), "puzzles"
    if weights is not None and weights.shape[-1] != len(completions):
        raise ValueError(f"bootstrap weights for {weights.shape[-1]} predictions but {len(completions)} completions")
    rows = [judge(c, a) for c, a in zip(completions, answers)]
    out = _summarise(rows, weights)
    if weights is not None:
        out["ci_scheme"] = scheme
    out["reward"] = float(np.mean([batch_reward(c, a) for c, a in zip(completions, answers)]))
    by_n: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        by_n.setdefault(r["n"], []).append(i)
    out["by_n"] = {int(n): _summarise([rows[i] for i in ix], None if weights is None else weights[:, ix])
                   for n, ix in sorted(by_n.items())}
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

"""The promotion gate's decision rule without a server: the paired bootstrap and the margin
and tolerance against a champion, on evaluations with known accuracies."""

from __future__ import annotations

import numpy as np

from cellpuzzles.evaluation.compare import paired_bootstrap
from cellpuzzles.evaluation.record import read_evaluation
from cellpuzzles.release.gate import GateOptions, decide

from helpers.registry import make_test_set, write_eval


def test_paired_bootstrap_and_margin(tmp_path):
    diff = np.array([1.0] * 10 + [0.0] * 30)
    mean, lo, hi = paired_bootstrap(diff, 2000, 0.95, 0)
    assert mean == 0.25 and 0.1 < lo < 0.25 < hi <= 0.4
    ps = make_test_set()
    old = read_evaluation(write_eval(tmp_path / "old", ps, set(range(20))))
    new = read_evaluation(write_eval(tmp_path / "new", ps, set(range(30))))
    assert decide(new, old, GateOptions(margin=0.05))[0] == []
    reasons, ev = decide(new, old, GateOptions(margin=0.2))  # +0.25 but its lower bound is below +0.2
    assert reasons and "better by 0.2" in reasons[0] and ev["ci_low"] < 0.2
    assert decide(old, new, GateOptions(tolerance=0.45))[0] == []  # a drop whose CI stays within the tolerance
    assert decide(old, new, GateOptions(tolerance=0.3))[0]  # CI lower bound -0.4 is beyond -0.3

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
    # these puzzles share no cell: the margin and tolerance logic on the puzzle bootstrap
    # (test_gate_resamples_cells_by_default covers the cell scheme)
    old.pop("cells"), new.pop("cells")
    assert decide(new, old, GateOptions(margin=0.05))[0] == []
    reasons, ev = decide(new, old, GateOptions(margin=0.2))  # +0.25 but its lower bound is below +0.2
    assert reasons and "better by 0.2" in reasons[0] and ev["ci_low"] < 0.2
    assert decide(old, new, GateOptions(tolerance=0.45))[0] == []  # a drop whose CI stays within the tolerance
    assert decide(old, new, GateOptions(tolerance=0.3))[0]  # CI lower bound -0.4 is beyond -0.3


def test_gate_resamples_cells_by_default(tmp_path):
    ps = make_test_set()
    old = read_evaluation(write_eval(tmp_path / "old", ps, set(range(20))))
    new = read_evaluation(write_eval(tmp_path / "new", ps, set(range(30))))
    _, ev = decide(new, old, GateOptions())
    assert ev["resampled"] == "cells" and ev["delta"] == 0.25
    _, plain = decide({**new, "cells": None}, old, GateOptions())
    assert plain["resampled"] == "puzzles"
    # with no shared cell the cell scheme is conservative: never narrower than the puzzle bootstrap
    assert ev["ci_high"] - ev["ci_low"] >= plain["ci_high"] - plain["ci_low"]


def _with_baselines(rec: dict, peer: float, ceiling6: float) -> dict:
    def m(acc):
        return {"batch_accuracy": acc, "batch_accuracy_ci": [acc - 0.1, acc + 0.1], "cell_accuracy": 0.9,
                "by_n": {"3": {"batch_accuracy": acc}, "4": {"batch_accuracy": acc}, "5": {"batch_accuracy": acc}}}
    return {**rec, "baselines": {"random": m(0.02), "markers": m(0.5), "logreg_1to1": m(peer),
                                 "ceiling_top6": m(ceiling6), "ceiling_top50": m(0.55)}}


def test_gate_report_places_the_challenger_beside_peer_ceiling_and_baselines_per_n(tmp_path):
    from cellpuzzles.release.gate import report_markdown

    ps = make_test_set()
    new = _with_baselines(read_evaluation(write_eval(tmp_path / "new", ps, set(range(30)))), 0.84, 0.43)
    reasons, ev = decide(new, None, GateOptions(), genes_shown=6)
    assert reasons == []  # the peer check is off by default: 0.75 < 0.84 does not block
    comp = ev["comparison"]
    assert list(comp["rows"]) == ["challenger", "classical peer", "input ceiling", "markers", "random"]
    assert comp["names"]["input ceiling"] == "ceiling_top6"  # the ceiling of the genes this model is shown
    assert comp["rows"]["challenger"]["batch_accuracy"] == 0.75 and comp["rows"]["classical peer"]["batch_accuracy"] == 0.84
    assert set(comp["by_n"]) == {"3", "4", "5"} and comp["by_n"]["3"]["classical peer"] == 0.84
    text = report_markdown("m", "1", True, reasons, ev, GateOptions())
    assert "## Compared to what" in text and "| N | challenger | classical peer | input ceiling | markers | random |" in text
    assert "top 6 gene names" in text and "off (peer_tolerance unset)" in text


def test_peer_tolerance_refuses_a_challenger_far_below_the_classical_peer(tmp_path):
    ps = make_test_set()
    rec = read_evaluation(write_eval(tmp_path / "new", ps, set(range(30))))  # 0.75
    reasons, _ = decide(_with_baselines(rec, 0.84, 0.43), None, GateOptions(peer_tolerance=0.05))
    assert reasons and "classical peer 0.8400" in reasons[0]
    assert decide(_with_baselines(rec, 0.78, 0.43), None, GateOptions(peer_tolerance=0.05))[0] == []
    reasons, _ = decide(rec, None, GateOptions(peer_tolerance=0.05))  # no baselines scored: say so
    assert reasons and "no classical peer" in reasons[0]

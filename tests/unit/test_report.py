"""docs/ tables come from a run's summary.json: the generated block is replaced, not duplicated."""

import json

import pytest

from cellpuzzles.core.errors import CellPuzzlesError
from cellpuzzles.pipelines.report import BEGIN, END, report

SUMMARY = {
    "seed": 0, "wall_seconds": 500.0,
    "baselines": {"markers": {"batch_accuracy": 0.5, "batch_accuracy_ci": [0.45, 0.55], "cell_accuracy": 0.8}},
    "models": {"grpo": {"constrained": {"batch_accuracy": 0.33, "batch_accuracy_ci": [0.28, 0.38], "cell_accuracy": 0.66,
                                        "cell_accuracy_ci": [0.6, 0.7], "format_ratio": 1.0}}},
    "rl_vs_sft": {"constrained": {"after": 0.33, "before": 0.28, "difference": 0.05, "ci": [0.01, 0.09], "n": 400}},
    "provenance": {"versions": {"torch": "2.13.0", "transformers": "5.24.0"}, "code": {"commit": "abcdef123456", "dirty": False},
                   "machine": {"cpus": 2, "cpu": "EPYC", "python": "3.11.7"}},
}


def test_report_writes_the_generated_block_once(tmp_path):
    src = tmp_path / "summary.json"
    src.write_text(json.dumps(SUMMARY))
    doc = tmp_path / "results.md"
    doc.write_text("# Results\n\nhand-written intro\n")
    text = report(src, doc)
    assert "| grpo | constrained | 0.330 [0.280, 0.380] |" in text and "+0.050 [+0.010, +0.090]" in text
    assert "transformers 5.24.0" in text and "commit abcdef1234" in text
    report(src, doc)
    body = doc.read_text()
    assert body.startswith("# Results\n\nhand-written intro") and body.count(BEGIN) == 1 and body.count(END) == 1


def test_report_of_a_missing_summary_is_one_line(tmp_path):
    with pytest.raises(CellPuzzlesError, match="no such file"):
        report(tmp_path / "nope.json")


def test_report_of_several_seeds_shows_each_seed_and_the_spread(tmp_path):
    files = []
    for seed, acc in ((0, 0.33), (1, 0.25)):
        s = json.loads(json.dumps(SUMMARY))
        s["seed"] = seed
        s["models"]["grpo"]["constrained"]["batch_accuracy"] = acc
        f = tmp_path / f"s{seed}.json"
        f.write_text(json.dumps(s))
        files.append(f)
    text = report(files)
    assert "| model | seed 0 | seed 1 | min–max |" in text
    assert "| grpo | 0.330 | 0.250 | 0.250–0.330 |" in text
    assert "| markers (baseline) | 0.500 | 0.500 | 0.500–0.500 |" in text
    assert "| RL − SFT (paired) | +0.050 [+0.010, +0.090] | +0.050 [+0.010, +0.090] | |" in text

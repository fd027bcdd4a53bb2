"""The Cell-o1 reward and metrics, case by case."""

import pytest

from cellpuzzles.task.puzzle import extract_answer, format_completion, is_well_formed
from cellpuzzles.task.reward import batch_reward, judge, score

GOLD = "B cell | T cell | NK cell"


def c(answer: str, think: str = "reasoning") -> str:
    return f"<think>{think}</think>\n<answer>{answer}</answer>"


@pytest.mark.parametrize("completion,expected", [
    (c("B cell | T cell | NK cell"), 1.0),                      # all right
    (c(" b CELL|t cell |NK Cell "), 1.0),                        # case and spaces ignored
    (c("T cell | B cell | NK cell"), (1 / 3 + 0) / 2),           # one of three right
    (c("NK cell | B cell | T cell"), 0.0),                       # none right, still valid
    (c("B cell | T cell"), -1.0),                                # wrong count
    (c("B cell | T cell | NK cell | monocyte"), -1.0),
    (c("B cell | B cell | NK cell"), -1.0),                      # repeated label
    (c("B cell | b cell | NK cell"), -1.0),                      # repeat up to case
    ("B cell | T cell | NK cell", -1.0),                         # no tags
    ("<think>x</think><answer>B cell | T cell | NK cell</answer>", -1.0),   # missing newline
    ("<think>x</think>\n<answer>B cell | T cell | NK cell</answer> ok", -1.0),  # trailing text
    # Python's `$` (as in the reference's regex) also matches before one final newline
    ("<think>x</think>\n<answer>B cell | T cell | NK cell</answer>\n", 1.0),
    ("<think><think>x</think>\n<answer>B cell | T cell | NK cell</answer>", -1.0),  # two <think>
    ("pre <think>x</think>\n<answer>B cell | T cell | NK cell</answer>", -1.0),  # text before
    (c("B cell"), -1.0),                                         # no '|' in the answer
])
def test_batch_reward_cases(completion, expected):
    assert batch_reward(completion, GOLD) == pytest.approx(expected)


def test_think_may_span_lines():
    assert batch_reward(c(GOLD, think="line one\nline two\n"), GOLD) == 1.0


def test_extract_answer_rules():
    assert extract_answer("<answer>A | B</answer>") == "A | B"
    assert extract_answer("x\n<answer>A | B\nmore</answer>") == "A | B"     # first line only
    assert extract_answer("no tags\nA | B\nC | D") == "A | B"                # fallback: first line with '|'
    assert extract_answer("nothing here") is None


def test_well_formed_matches_reward_sign():
    assert is_well_formed(format_completion("t", ["A", "B"]))
    assert not is_well_formed(format_completion("t", ["A"]))


def test_metrics_follow_reference_evaluator():
    answers = [GOLD, GOLD, GOLD, "A | B | C | D"]
    completions = [
        c(GOLD),                                   # exact: 3 correct
        c("B cell | NK cell | T cell"),            # 1 correct, legit
        "garbage",                                 # ill-formed: 0 correct, gold cells count, uniqueness 0
        c("A | B | A"),                            # legit for metrics (no length/dup check): 2 correct over min length
    ]
    s = score(completions, answers, n_boot=200)
    assert s["n"] == 4
    assert s["cell_accuracy"] == pytest.approx((3 + 1 + 0 + 2) / (3 + 3 + 3 + 4))
    assert s["batch_accuracy"] == pytest.approx(1 / 4)
    assert s["format_ratio"] == pytest.approx(3 / 4)
    assert s["uniqueness"] == pytest.approx((1 + 1 + 0 + 2 / 3) / 4)
    assert judge("garbage", GOLD)["uniqueness"] == 0.0
    # reward differs from the metric for the short/duplicate answer
    assert batch_reward(completions[3], answers[3]) == -1.0
    assert s["reward"] == pytest.approx((1.0 + (1 / 3) / 2 - 1.0 - 1.0) / 4)


def test_intervals_and_by_n():
    answers = [GOLD] * 30 + ["A | B | C | D"] * 30
    comps = [c(GOLD)] * 15 + [c("T cell | B cell | NK cell")] * 15 + [c("A | B | C | D")] * 30
    s = score(comps, answers, n_boot=500, seed=1)
    lo, hi = s["batch_accuracy_ci"]
    assert lo < s["batch_accuracy"] < hi
    assert 0.0 <= lo and hi <= 1.0
    assert set(s["by_n"]) == {3, 4}
    assert s["by_n"][3]["batch_accuracy"] == pytest.approx(0.5)
    assert s["by_n"][4]["batch_accuracy"] == pytest.approx(1.0)
    assert score(comps, answers, n_boot=500, seed=1) == s  # deterministic


def test_score_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        score([c(GOLD)], [])

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


# -- parity with the reference evaluator ------------------------------------------------------
# An independent transcription of the reference evaluator's rule (FACTS.md), written here from
# its description with nothing imported from the package: format check, answer extraction,
# position-by-position comparison over the shorter list, exact match when correct == len(gold).
import random  # noqa: E402
import re  # noqa: E402

_REF_FORMAT = re.compile(r"^<think>.*?</think>\n<answer>.*?</answer>$", re.DOTALL)


def _ref_answer(text: str):
    for line in text.split("\n"):
        if "<answer>" in line:
            a = line.split("<answer>", 1)[1]
            return a[: -len("</answer>")] if a.endswith("</answer>") else a
    return next((line for line in text.split("\n") if "|" in line), None)


def _ref_legit(text: str) -> bool:
    if any(text.count(t) != 1 for t in ("<think>", "</think>", "<answer>", "</answer>")):
        return False
    a = _ref_answer(text)
    return bool(_REF_FORMAT.match(text)) and a is not None and "|" in a


def _ref_metrics(completions, answers):
    correct = gold_cells = exact = 0
    for text, gold_text in zip(completions, answers):
        gold = [g.strip().lower() for g in gold_text.split("|")]
        gold_cells += len(gold)
        if not _ref_legit(text):
            continue
        pred = [p.strip().lower() for p in _ref_answer(text).split("|")]
        k = sum(pred[i] == gold[i] for i in range(min(len(pred), len(gold))))
        correct += k
        exact += k == len(gold)
    return {"cell_accuracy": correct / gold_cells, "batch_accuracy": exact / len(completions)}


TYPES = ["B cell", "T cell", "NK cell", "monocyte", "dendritic cell", "CD34+"]


def _fuzzed(rng: random.Random, gold: list[str]) -> str:
    """A completion a model might write: right, shuffled, short, long (extra labels after a
    right answer), repeated, case/space noise, broken tags, no tags."""
    labels = list(gold)
    kind = rng.random()
    if kind < 0.2:
        rng.shuffle(labels)
    elif kind < 0.35:
        labels = labels + rng.sample(TYPES, rng.randint(1, 2))  # extra labels: the parity case
    elif kind < 0.45:
        labels = labels[: rng.randint(1, len(labels) - 1)]
    elif kind < 0.55:
        labels[rng.randrange(len(labels))] = labels[0]
    labels = [x.upper() if rng.random() < 0.1 else (" " + x + " " if rng.random() < 0.1 else x) for x in labels]
    ans = " | ".join(labels)
    form = rng.random()
    if form < 0.7:
        return f"<think>r</think>\n<answer>{ans}</answer>"
    if form < 0.8:
        return f"<think>r</think><answer>{ans}</answer>"  # no newline: format failure
    if form < 0.9:
        return ans  # no tags
    return f"<think>a</think>\n<answer>{ans}</answer>\n<answer>{ans}</answer>"  # two answers


def test_batch_accuracy_equals_the_reference_evaluator_on_fuzzed_completions():
    rng = random.Random(7)
    answers, completions = [], []
    for _ in range(3000):
        gold = rng.sample(TYPES, rng.randint(3, 6))
        answers.append(" | ".join(gold))
        completions.append(_fuzzed(rng, gold))
    ours, ref = score(completions, answers, n_boot=0), _ref_metrics(completions, answers)
    assert ours["batch_accuracy"] == pytest.approx(ref["batch_accuracy"], abs=1e-12)
    assert ours["cell_accuracy"] == pytest.approx(ref["cell_accuracy"], abs=1e-12)
    # the fuzz exercises the rule that matters: predictions with extra labels count as exact,
    # so the strict variant (same list exactly) is lower
    assert ours["batch_accuracy_strict"] < ours["batch_accuracy"]


def test_extra_labels_after_a_right_answer_count_as_exact_but_not_strict():
    s = score([c(GOLD + " | monocyte")], [GOLD], n_boot=0)
    assert s["batch_accuracy"] == 1.0 and s["batch_accuracy_strict"] == 0.0
    short = score([c("B cell | T cell")], [GOLD], n_boot=0)
    assert short["batch_accuracy"] == 0.0 and short["cell_accuracy"] == pytest.approx(2 / 3)


def test_bootstrap_weights_replace_the_puzzle_bootstrap():
    import numpy as np

    comps, answers = [c(GOLD), c("T cell | B cell | NK cell")], [GOLD, GOLD]
    w = np.array([[2.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    s = score(comps, answers, weights=w, scheme="cells")
    assert s["ci_scheme"] == "cells"
    assert s["batch_accuracy_ci"][0] == pytest.approx(0.025) and s["batch_accuracy_ci"][1] == pytest.approx(0.975)
    with pytest.raises(ValueError, match="weights for 3"):
        score(comps, answers, weights=np.ones((2, 3)))

"""The serving protocol without a server: the transformer's repair of a free answer, the
judging of completions, and ranking raw expression into top genes."""

import pytest

from cellpuzzles.task.puzzle import format_completion


def test_transformer_repair_keeps_the_models_labels():
    from cellpuzzles.serving.protocol import Instance, check_completion
    from cellpuzzles.serving.transformer import repair
    from cellpuzzles.task.puzzle import Puzzle

    cands = ["B", "NK", "T"]
    p = Puzzle(genes=[["a"], ["b"], ["c"]], candidates=cands, answer=cands, context="x")
    inst = Instance(p, ["x", "y", "z"], "constrained")
    assert repair(inst, ["T", "T", "B"]) == ["T", "NK", "B"]  # the first T stays, the repeat is fixed
    assert repair(inst, ["nk", "B", "unknown"]) == ["NK", "B", "T"]
    assert sorted(repair(inst, None)) == cands
    good = format_completion("r", ["nk", "T", "B"])
    assert check_completion(p, good).valid and check_completion(p, good).labels == ["NK", "T", "B"]
    assert "used more than once" in check_completion(p, format_completion("r", ["B", "B", "T"])).reason
    assert "2 labels" in check_completion(p, format_completion("r", ["B", "T"])).reason
    assert "format" in check_completion(p, "<answer>B | NK | T</answer>").reason


def test_top_genes_order_and_ties():
    from cellpuzzles.serving.protocol import RequestError, top_genes

    assert top_genes({"B": 1.0, "A": 1.0, "C": 3, "D": 0}, 3, "x") == ["C", "A", "B"]
    with pytest.raises(RequestError, match=r"x\.A: expected a finite number"):
        top_genes({"A": float("nan")}, 3, "x")

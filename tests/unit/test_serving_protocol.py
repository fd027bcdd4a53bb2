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


def _inst(cands=("B cell", "T cell"), genes=("CD3D",)):
    return {"context": "A donor.", "cells": [{"genes": list(genes)} for _ in cands], "candidates": list(cands)}


@pytest.mark.parametrize("bad", ["B | x", "B|x", "a\nb", "a\rb", "<answer>", "</answer>", "<think>", "x</think>"])
def test_candidates_the_format_cannot_carry_are_refused_by_index(bad):
    from cellpuzzles.serving.protocol import Limits, RequestError, parse_instance

    with pytest.raises(RequestError, match=r"^x\.candidates\[1\]: contains"):
        parse_instance(_inst(("T cell", bad)), "x", Limits(), "constrained")


def test_instance_and_gene_limits_name_the_limit_and_the_value():
    from cellpuzzles.serving.protocol import Limits, RequestError, parse_instance, parse_instances

    lim = Limits(max_instances=2, max_genes=3)
    with pytest.raises(RequestError, match=r"^instances: 3 instances is above the limit of 2 .*--max-instances"):
        parse_instances({"instances": [_inst()] * 3}, lim, "free")
    assert len(parse_instances({"instances": [_inst()] * 2}, lim, "free")) == 2
    with pytest.raises(RequestError, match=r"x\.cells\[0\]\.genes: 4 genes is above the limit of 3 \(--max-genes\)"):
        parse_instance(_inst(genes=("A", "B", "C", "D")), "x", lim, "free")
    many = {"cells": [{"expression": {g: 1.0 for g in "ABCD"}}] * 2}
    with pytest.raises(RequestError, match=r"x\.cells\[0\]\.expression: 4 genes"):
        parse_instance({**_inst(), **many}, "x", lim, "free")


def test_openai_sampling_fields():
    from cellpuzzles.serving.openai import sampling
    from cellpuzzles.serving.protocol import RequestError

    assert sampling({}) == (None, 0.0)
    assert sampling({"max_tokens": 7, "temperature": 0.5}) == (7, 0.5)
    assert sampling({"max_completion_tokens": 3}) == (3, 0.0)
    for body, field in (({"max_tokens": 0}, "max_tokens"), ({"max_tokens": True}, "max_tokens"),
                        ({"temperature": 2.5}, "temperature"), ({"temperature": "1"}, "temperature")):
        with pytest.raises(RequestError, match=f"^{field}:"):
            sampling(body)


def test_serve_options_refuse_bad_limits():
    from cellpuzzles.core.errors import CellPuzzlesError
    from cellpuzzles.serving.options import ServeOptions

    ServeOptions(model="m").check()
    for kw, match in (({"max_instances": 0}, "--max-instances 0"), ({"max_prompt_tokens": 0}, "--max-prompt-tokens"),
                      ({"request_timeout_s": 0}, "--request-timeout-s 0"), ({"host": " "}, "--host")):
        with pytest.raises(CellPuzzlesError, match=match):
            ServeOptions(model="m", **kw).check()


def _batches(interleave: bool, cancel_big_after: int | None = None):
    """The batches a MicroBatcher forms for a 6-item request followed by two 1-item requests
    (run_batch records them; the model is not needed to test the schedule)."""
    import asyncio
    import time

    from cellpuzzles.serving.batching import MicroBatcher

    seen = []

    def run_batch(items):
        seen.append(list(items))
        time.sleep(0.05)  # a batch takes a while, so there is time to cancel
        return list(items)

    async def main():
        b = MicroBatcher(run_batch, max_batch_size=2, max_wait_ms=20, interleave=interleave)
        big = asyncio.ensure_future(b.submit_many([f"big{i}" for i in range(6)]))
        await asyncio.sleep(0)
        small = [asyncio.ensure_future(b.submit(f"small{i}")) for i in range(2)]
        if cancel_big_after is not None:
            while len(seen) < cancel_big_after:
                await asyncio.sleep(0.001)
            big.cancel()
        results = await asyncio.gather(big, *small, return_exceptions=True)
        return results

    return asyncio.run(main()), seen


def test_batcher_interleaves_requests_and_drops_a_cancelled_requests_work():
    results, seen = _batches(interleave=True)
    assert results[0] == [f"big{i}" for i in range(6)] and results[1:] == ["small0", "small1"]  # each its own
    # the first batch left before the small requests came; from then on each request gets a slot in turn
    assert seen[:3] == [["big0", "big1"], ["big2", "small0"], ["small1", "big3"]]
    _, fifo = _batches(interleave=False)
    assert fifo == [["big0", "big1"], ["big2", "big3"], ["big4", "big5"], ["small0", "small1"]]  # first come first
    results, seen = _batches(interleave=True, cancel_big_after=1)
    flat = [x for b in seen for x in b]
    assert isinstance(results[0], BaseException) and results[1:] == ["small0", "small1"]
    assert len([x for x in flat if x.startswith("big")]) < 6  # the rest of the cancelled request never ran

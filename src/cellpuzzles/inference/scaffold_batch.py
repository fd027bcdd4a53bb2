"""Constrained decoding of many puzzles in one batch, for candidate names of any token length.

Two layouts of the slots (``cellpuzzles.inference.slot_batch.Layout``): the per-cell scaffold
(``cellpuzzles.task.scaffold``: ``Cell i: <genes> -> `` before each type) for a model trained
on scaffold traces, and the answer slots (``<answer>a | b | c</answer>``) after the model's
own think part otherwise. ``slot_batch.fill_slots`` scores every candidate at slot i of every
puzzle in one forward pass over a shared KV cache, each candidate as the tokenizer encodes it
in place; the cells x candidates matrix is then assigned one-to-one (Hungarian), so the
answer is always a valid permutation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cellpuzzles.inference.slot_batch import Layout, fill_slots
from cellpuzzles.task.assign import assign_labels
from cellpuzzles.task.puzzle import ANSWER_SEP, Puzzle, format_completion
from cellpuzzles.task.scaffold import cell_line, think_lines


def batchable(tok, puzzles: Sequence[Puzzle]) -> bool:
    """Whether every candidate is one token on its own (the tiny model's types are)."""
    cands = {c for p in puzzles for c in p.candidates}
    return all(len(tok(c, add_special_tokens=False)["input_ids"]) == 1 for c in cands)


def scaffold_layout(p: Puzzle, k: int) -> Layout:
    """The scaffold's slots: ``<think>Cell 1: G1, .., Gk -> `` type ``\\nCell 2: ...``."""
    return Layout(list(p.candidates), lambda i: ("<think>" if i == 0 else "\n") + cell_line(i, p.genes[i], k),
                  lambda labels: f"</think>\n<answer>{ANSWER_SEP.join(labels)}</answer>", p.n)


def answer_layout(p: Puzzle, think: str) -> Layout:
    """The answer's slots after a think part: ``<answer>a | b | c</answer>``."""
    return Layout(list(p.candidates), lambda i: f"<think>{think}</think>\n<answer>" if i == 0 else ANSWER_SEP,
                  lambda labels: "</answer>", p.n)


def prompt_ids(tok, puzzles: Sequence[Puzzle]) -> list[list[int]]:
    from cellpuzzles.inference.prompting import prompt_text

    return tok([prompt_text(tok, p) for p in puzzles], add_special_tokens=False)["input_ids"]


def constrained_batch(model, tok, puzzles: Sequence[Puzzle], k: int | None = None,
                      thinks: Sequence[str] | None = None) -> list[tuple[str, np.ndarray]]:
    """(completion, cells x candidates score matrix) per puzzle: the scaffold's slots with
    ``k`` restated genes, else the answer slots after ``thinks`` (the model's own think parts)."""
    thinks = list(thinks) if thinks is not None else [""] * len(puzzles)
    layouts = [scaffold_layout(p, k) if k else answer_layout(p, t) for p, t in zip(puzzles, thinks)]
    results = []
    for p, t, row in zip(puzzles, thinks, fill_slots(model, tok, prompt_ids(tok, puzzles), layouts)):
        labels = assign_labels(row.scores, p.candidates)
        results.append((format_completion(think_lines(p, k, labels) if k else t, labels), row.scores))
    return results

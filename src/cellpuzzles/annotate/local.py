"""Answering puzzles with a local model folder.

constrained  every candidate is scored at every group's slot by the project's constrained
             decoder (``cellpuzzles.inference.slot_batch.fill_slots`` over the slot layouts of
             ``cellpuzzles.inference.scaffold_batch``: the scaffold's type slots for a model
             trained on scaffold traces, else the answer slots after the model's own think
             part; earlier slots hold the best unused candidates) -- the path
             ``decode.constrained`` takes, here also for puzzles with more candidates than
             groups, so each puzzle yields a groups x candidates score matrix.
free         the model's own text, parsed; its labels are kept as written.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from cellpuzzles.annotate.answers import PuzzleAnswer, labels_from_text, shape_note
from cellpuzzles.annotate.assignment import assign_columns
from cellpuzzles.annotate.options import ONE_TO_ONE, Assignment
from cellpuzzles.task.puzzle import Puzzle, format_completion, think_part

BATCH = 16  # puzzles per constrained forward pass


class LocalModel:
    """A model folder loaded once; ``answer`` decodes puzzles in the model's prompt form."""

    def __init__(self, folder: str | os.PathLike):
        from cellpuzzles.inference.folder import load_model

        self.folder = str(folder)
        self.model, self.tok, self.prompt = load_model(folder)
        self.model.eval()

    def answer(self, puzzles: Sequence[Puzzle], mode: str) -> list[PuzzleAnswer]:
        from cellpuzzles.inference.decode import DecodeOptions, generate

        shown = [self.prompt.apply(p) for p in puzzles]
        k = self.prompt.restated_genes
        # free text: for free mode, and for the think part of a model not trained on the scaffold
        texts = [""] * len(shown)
        if mode == "free" or not k:
            texts = generate(self.model, self.tok, shown, DecodeOptions(
                batch_size=max(1, len(shown)), tokens_per_cell=getattr(self.prompt, "tokens_per_cell", None)))
        if mode == "free":
            out = []
            for p, text in zip(shown, texts):
                labels, why = labels_from_text(p, text)
                notes = [n for n in (shape_note(p), why and f"free answer not valid: {why}") if n]
                out.append(PuzzleAnswer(labels=labels, completion=text, notes=notes))
            return out
        return [PuzzleAnswer(labels=labels, completion=completion, scores=scores)
                for completion, scores, labels in score_puzzles(self.model, self.tok, shown, texts, k)]


def score_puzzles(model, tok, puzzles: Sequence[Puzzle], completions: Sequence[str],
                  restated: int | None) -> list[tuple[str, np.ndarray, list[str]]]:
    """(completion, cells x candidates scores, one-to-one labels) per puzzle (already in the
    model's prompt form); a puzzle may have more candidates than cells (spare ones unused)."""
    import torch

    from cellpuzzles.inference.scaffold_batch import answer_layout, prompt_ids, scaffold_layout
    from cellpuzzles.inference.slot_batch import fill_slots
    from cellpuzzles.task.scaffold import think_lines

    model.eval()
    out = []
    for s in range(0, len(puzzles), BATCH):
        ps = list(puzzles[s:s + BATCH])
        thinks = [think_part(c) for c in completions[s:s + BATCH]]
        layouts = [scaffold_layout(p, restated) if restated else answer_layout(p, t) for p, t in zip(ps, thinks)]
        with torch.no_grad():
            rows = fill_slots(model, tok, prompt_ids(tok, ps), layouts)
        for p, think, row in zip(ps, thinks, rows):
            scores = np.asarray(row.scores, dtype=float)
            labels = [p.candidates[j] for j in assign_columns(scores, Assignment(ONE_TO_ONE, 1))]
            text = format_completion(think_lines(p, restated, labels) if restated else think, labels)
            out.append((text, scores, labels))
    return out

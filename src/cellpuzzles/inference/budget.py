"""How many new tokens free decoding may write: from the model's own tokenizer and traces.

A model folder trained here records ``tokens_per_cell`` in cellpuzzles.json: the largest
number of tokens per cell among its SFT traces (the assistant turn with its end-of-turn
token), measured with its tokenizer. A completion for a puzzle of N cells may then use
``ceil(MARGIN * tokens_per_cell * N) + SLACK`` new tokens, so every trace of the kind the model
learnt fits, whatever the tokenizer splits gene and type names into. A folder that records
nothing (a pretrained model before SFT) gets an estimate from the prompt itself: a trace
restates at most each cell's line of the prompt with a label and a little evidence."""

from __future__ import annotations

import math
from collections.abc import Sequence

from cellpuzzles.task.puzzle import Puzzle

MARGIN = 1.25  # room above the longest trace per cell
SLACK = 32  # fixed room (answer tags, end of turn)
ESTIMATE_FACTOR = 1.5  # prompt tokens per cell -> trace tokens per cell, for folders with no record


def trace_tokens(tok, trace: str) -> int:
    """Tokens of one assistant turn as the model writes it (text plus end-of-turn)."""
    return len(tok(trace, add_special_tokens=False)["input_ids"]) + 1


def tokens_per_cell(tok, pairs: Sequence[tuple[Puzzle, str]]) -> float:
    """The largest tokens-per-cell among (puzzle, trace) pairs."""
    return max(trace_tokens(tok, t) / p.n for p, t in pairs)


def estimated_tokens_per_cell(tok, puzzles: Sequence[Puzzle]) -> float:
    """For a folder that records no traces: the prompt's tokens per cell, times ESTIMATE_FACTOR."""
    return max(ESTIMATE_FACTOR * len(tok(p.user_msg, add_special_tokens=False)["input_ids"]) / p.n for p in puzzles)


def new_token_budget(tok, puzzles: Sequence[Puzzle], per_cell: float | None) -> int:
    """New tokens allowed for a batch of puzzles (its largest N)."""
    per_cell = per_cell or estimated_tokens_per_cell(tok, puzzles)
    return math.ceil(MARGIN * per_cell * max(p.n for p in puzzles)) + SLACK

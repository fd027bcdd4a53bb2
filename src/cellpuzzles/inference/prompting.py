"""The prompt a model sees: the puzzle's messages through the model's own chat template."""

from __future__ import annotations

from cellpuzzles.task.puzzle import Puzzle


def prompt_text(tok, puzzle: Puzzle) -> str:
    return tok.apply_chat_template(puzzle.messages(), tokenize=False, add_generation_prompt=True)

"""The teacher interface used by distillation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from cellpuzzles.task.puzzle import Puzzle


@dataclass
class Reply:
    """One teacher completion for (puzzle, attempt). ``text`` is None when the teacher gave
    nothing usable (empty answer, or an error after all retries: ``error`` says which)."""

    puzzle_id: str
    attempt: int
    text: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: bool = False
    error: str | None = None


class Teacher(Protocol):
    name: str

    def complete_many(self, items: Sequence[tuple[Puzzle, int]]) -> list[Reply]:
        """Completions for (puzzle, attempt) pairs, in order. Attempt k of a puzzle must be
        reproducible (same cache key) so a rerun repeats no paid call."""
        ...

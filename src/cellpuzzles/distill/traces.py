"""Distillation: a teacher writes reasoning traces; keep a trace only when its reward reaches
the threshold (rejection sampling, up to ``attempts`` tries per puzzle).

Output: JSONL records in the public CellPuzzles schema whose ``assistant_msg`` is the
accepted trace (as in the public ``reasoning`` split), plus the structured fields, the
reward and the attempt that was kept.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cellpuzzles.core.errors import CellPuzzlesError
from cellpuzzles.core.records import read_jsonl, write_jsonl
from cellpuzzles.distill.teachers.base import Reply, Teacher
from cellpuzzles.task.puzzle import Puzzle, is_well_formed, puzzle_from_record
from cellpuzzles.task.reward import batch_reward


@dataclass
class DistillOptions:
    attempts: int = 1  # tries per puzzle (k)
    threshold: float = 1.0  # keep a trace whose reward is at least this


def distill(puzzles: Sequence[Puzzle], teacher: Teacher, opt: DistillOptions, out: str | os.PathLike,
            progress=None) -> dict:
    """Run rejection sampling over ``puzzles``; write accepted traces to ``out``; return stats."""
    if opt.attempts < 1:
        raise CellPuzzlesError(f"--attempts {opt.attempts}: must be at least 1")
    accepted: dict[str, tuple[Puzzle, str, float, int]] = {}
    pending = list(puzzles)
    replies: list[Reply] = []
    for attempt in range(opt.attempts):
        if not pending:
            break
        got = teacher.complete_many([(p, attempt) for p in pending])
        replies += got
        still = []
        for p, r in zip(pending, got):
            reward = batch_reward(r.text, p.answer_text) if r.text else -1.0
            if r.text and reward >= opt.threshold:
                accepted[p.puzzle_id] = (p, r.text, reward, attempt)
            else:
                still.append(p)
        pending = still
        if progress:
            progress(attempt, len(accepted), len(puzzles))
    rows = []
    for p in puzzles:  # keep input order
        if p.puzzle_id in accepted:
            _, text, reward, attempt = accepted[p.puzzle_id]
            rows.append({**p.to_record(), "assistant_msg": text, "reward": reward, "attempt": attempt,
                         "teacher": teacher.name})
    if not rows:
        raise CellPuzzlesError(
            f"the {teacher.name} teacher produced no acceptable trace for {len(puzzles)} puzzles "
            f"(threshold {opt.threshold}); check the teacher's answers or lower --threshold"
        )
    write_jsonl(out, rows)
    calls = [r for r in replies if not r.cached]
    return {
        "teacher": teacher.name,
        "puzzles": len(puzzles),
        "accepted": len(rows),
        "acceptance_rate": len(rows) / len(puzzles),
        "attempts_used": len(replies),
        "calls": len(calls),
        "cached": sum(r.cached for r in replies),
        "errors": sum(r.error is not None for r in replies),
        "prompt_tokens": sum(r.prompt_tokens for r in replies),
        "completion_tokens": sum(r.completion_tokens for r in replies),
        "output": str(out),
    }


def read_traces(path: str | os.PathLike) -> list[tuple[Puzzle, str]]:
    """(puzzle, trace) pairs from a distilled JSONL file; errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise CellPuzzlesError(f"{path}: traces file not found; run `cellpuzzles distill` first")
    out = []
    for lineno, rec in read_jsonl(path):
        try:
            out.append((puzzle_from_record(rec), rec["assistant_msg"]))
        except (ValueError, KeyError, TypeError) as e:
            raise CellPuzzlesError(f"{path}:{lineno}: not a valid trace record ({e}); fix or remove that line") from None
        if not is_well_formed(out[-1][1]):
            raise CellPuzzlesError(
                f"{path}:{lineno}: assistant_msg is not a reasoning trace (<think>…</think>\n<answer>…</answer>); "
                "pass the output of `cellpuzzles distill`"
            )
    if not out:
        raise CellPuzzlesError(f"{path}: no traces in the file; it is empty")
    return out

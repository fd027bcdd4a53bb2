"""JSON and JSONL files (one JSON value per line): the one reader and the one (atomic) writer
every stage uses for puzzles, traces, predictions, records and summaries."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from cellpuzzles.core.atomic import atomic_path
from cellpuzzles.core.errors import CellPuzzlesError


def read_json(path: str | os.PathLike, missing: str, fix: str) -> Any:
    """The JSON value in ``path``; a missing file or invalid JSON is one CellPuzzlesError line
    (``missing`` says what the file should have been, ``fix`` what to do about bad JSON)."""
    path = Path(path)
    if not path.is_file():
        raise CellPuzzlesError(f"{path}: no such file; {missing}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CellPuzzlesError(f"{path}: not valid JSON ({e.msg}); {fix}") from None


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` for each non-blank line of ``path``, read line by line. A line
    that is not JSON is a CellPuzzlesError naming the file and the line; what the values must
    look like is the caller's check."""
    path = Path(path)
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise CellPuzzlesError(f"{path}:{lineno}: not a JSON object ({e.msg}); fix or remove that line") from None


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    """Write one JSON object per line, atomically (core.atomic); returns the number of rows."""
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n

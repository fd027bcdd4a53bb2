"""The evaluation record a model carries into the registry and the gate.

A folder with ``evaluation.json`` (metrics per decoding mode, the reward and exact match of
every test puzzle, and each puzzle's test cells and their types, so two models scored on the
same puzzles can be compared pair by pair with intervals that resample test cells) and
``predictions_<mode>.jsonl`` (the completions, for people to read)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from cellpuzzles.core import atomic
from cellpuzzles.core.errors import CellPuzzlesError
from cellpuzzles.core.records import read_json, write_jsonl
from cellpuzzles.evaluation.compare import known_cells
from cellpuzzles.task.puzzle import Puzzle
from cellpuzzles.task.reward import batch_reward, judge

FILE = "evaluation.json"
BASELINES_FILE = "baselines.json"  # copied in by the evaluate step from the puzzles step
VERSION = 1


def puzzles_sha256(puzzles: Sequence[Puzzle]) -> str:
    """Identity of a test set: the ids and answers of its puzzles, in order."""
    h = hashlib.sha256()
    for p in puzzles:
        h.update(f"{p.puzzle_id}\t{p.answer_text}\n".encode())
    return h.hexdigest()


def write_evaluation(folder: str | os.PathLike, model: str, test: Sequence[Puzzle],
                     completions: dict[str, Sequence[str]], metrics: dict[str, dict]) -> Path:
    """``completions`` and ``metrics`` are keyed by decoding mode ('free', 'constrained')."""
    out = Path(folder)
    modes = {}
    for mode, comps in completions.items():
        rewards = {p.puzzle_id: batch_reward(c, p.answer_text) for p, c in zip(test, comps)}
        write_jsonl(out / f"predictions_{mode}.jsonl",
                    ({"puzzle_id": p.puzzle_id, "completion": c, "reward": rewards[p.puzzle_id]}
                     for p, c in zip(test, comps)))
        modes[mode] = {"metrics": {k: v for k, v in metrics[mode].items() if k != "by_n"},
                       "by_n": metrics[mode].get("by_n", {}), "rewards": rewards,
                       "exact": {p.puzzle_id: bool(judge(c, p.answer_text)["exact"]) for p, c in zip(test, comps)}}
    cells = known_cells(test)
    record = {"version": VERSION, "model": model, "test_sha256": puzzles_sha256(test),
              "n_puzzles": len(test), "modes": modes}
    if cells is not None:  # the test cells of each puzzle: intervals and paired tests resample them
        record["cells"] = {p.puzzle_id: c for p, c in zip(test, cells)}
        record["types"] = {p.puzzle_id: list(p.answer) for p in test}
    atomic.write_json(out / FILE, record)  # written last: its presence marks the folder complete
    return out / FILE


def read_evaluation(folder: str | os.PathLike) -> dict:
    path = Path(folder) / FILE
    rec = read_json(path, f"pass the output folder of an evaluation step (with {FILE})", "rerun the evaluation")
    if not isinstance(rec, dict) or rec.get("version") != VERSION or not isinstance(rec.get("modes"), dict):
        raise CellPuzzlesError(f"{path}: not a version-{VERSION} evaluation record; rerun the evaluation")
    base = Path(folder) / BASELINES_FILE
    if base.is_file():  # the baselines and peers scored on the same test puzzles (the puzzles step)
        rec["baselines"] = read_json(base, "", "rerun the puzzles step")
    return rec

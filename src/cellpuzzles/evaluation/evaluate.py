"""Scoring predictions and baseline solvers on a test split."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from cellpuzzles.core import atomic
from cellpuzzles.core.errors import CellPuzzlesError
from cellpuzzles.core.records import read_jsonl, write_jsonl
from cellpuzzles.evaluation.compare import score_puzzles
from cellpuzzles.task.puzzle import Puzzle, read_puzzles
from cellpuzzles.task.solvers import complete_all, make_solver


def read_predictions(path: str | os.PathLike) -> dict[str, str]:
    """``{puzzle_id: completion}`` from JSONL lines ``{"puzzle_id": ..., "completion": ...}``."""
    path = Path(path)
    if not path.is_file():
        raise CellPuzzlesError(f"{path}: predictions file not found; check the path")
    preds: dict[str, str] = {}
    for lineno, rec in read_jsonl(path):
        if not isinstance(rec, dict) or not isinstance(rec.get("puzzle_id"), str) or not isinstance(rec.get("completion"), str):
            raise CellPuzzlesError(f"{path}:{lineno}: expected {{\"puzzle_id\": str, \"completion\": str}}")
        if rec["puzzle_id"] in preds:
            raise CellPuzzlesError(f"{path}:{lineno}: duplicate prediction for puzzle {rec['puzzle_id']!r}")
        preds[rec["puzzle_id"]] = rec["completion"]
    if not preds:
        raise CellPuzzlesError(f"{path}: no predictions in the file; it is empty")
    return preds


def score_predictions(puzzles: Sequence[Puzzle], preds: dict[str, str], seed: int = 0) -> dict:
    """Score predictions against puzzles. A puzzle without a prediction scores as an empty
    (ill-formed) completion; predictions for unknown puzzles are an error."""
    ids = {p.puzzle_id for p in puzzles}
    unknown = [k for k in preds if k not in ids]
    if unknown:
        raise CellPuzzlesError(
            f"{len(unknown)} prediction(s) name puzzles not in the puzzle file (e.g. {unknown[0]!r}); "
            "score them against the right split"
        )
    completions = [preds.get(p.puzzle_id, "") for p in puzzles]
    result = score_puzzles(puzzles, completions, seed=seed)  # intervals resample test cells
    result["missing"] = sum(p.puzzle_id not in preds for p in puzzles)
    return result


def write_predictions(path: str | os.PathLike, puzzles: Sequence[Puzzle], completions: Sequence[str]) -> None:
    write_jsonl(path, ({"puzzle_id": p.puzzle_id, "completion": c} for p, c in zip(puzzles, completions)))


def evaluate_solver(
    name: str,
    train: Sequence[Puzzle],
    test: Sequence[Puzzle],
    out_dir: str | os.PathLike | None = None,
    seed: int = 0,
) -> dict:
    """Fit a solver on train puzzles only, complete the test puzzles, score them."""
    solver = make_solver(name, seed).fit(train)
    completions = complete_all(solver, test)
    result = score_puzzles(test, completions, seed=seed)
    if out_dir is not None:
        out = Path(out_dir)
        write_predictions(out / f"predictions_{name}.jsonl", test, completions)
        atomic.write_json(out / f"metrics_{name}.json", result)
    return result


def load_split_dir(path: str | os.PathLike) -> tuple[list[Puzzle], list[Puzzle]]:
    """Train (train + reasoning) and test puzzles from a ``cellpuzzles puzzles`` output folder."""
    d = Path(path)
    if not (d / "test.jsonl").is_file() or not (d / "train.jsonl").is_file():
        raise CellPuzzlesError(f"{d}: expected train.jsonl and test.jsonl (the output of `cellpuzzles puzzles`)")
    train = read_puzzles(d / "train.jsonl")
    if (d / "reasoning.jsonl").is_file():
        train += read_puzzles(d / "reasoning.jsonl")
    return train, read_puzzles(d / "test.jsonl")


def evaluate_model(
    model_path: str | os.PathLike,
    test: Sequence[Puzzle],
    out_dir: str | os.PathLike | None = None,
    modes: Sequence[str] = ("free", "constrained"),
    decode=None,
    name: str = "model",
    seed: int = 0,
) -> dict[str, dict]:
    """Free and/or constrained decoding of a model folder on test puzzles, scored.

    Writes ``predictions_<name>_<mode>.jsonl`` and ``metrics_<name>_<mode>.json``."""
    from tqdm.auto import tqdm

    from cellpuzzles.inference.decode import DecodeOptions, constrained_many, generate
    from cellpuzzles.inference.folder import load_model

    model, tok, prompt = load_model(model_path)
    shown = [prompt.apply(p) for p in test]
    free = [""] * len(shown)
    if "free" in modes or not prompt.restated_genes:  # the scaffold needs no free text
        bar = tqdm(total=len(shown), desc=f"decode {name}", leave=False, disable=not os.isatty(2))
        dec = decode or DecodeOptions(seed=seed)
        if dec.tokens_per_cell is None:  # the budget the model's own traces need (inference.budget)
            dec = replace(dec, tokens_per_cell=prompt.tokens_per_cell)
        free = generate(model, tok, shown, dec, progress=bar.update)
        bar.close()
    results: dict[str, dict] = {}
    for mode in modes:
        if mode == "free":
            completions = free
        elif mode == "constrained":
            completions = constrained_many(model, tok, shown, free, prompt.restated_genes)
        else:
            raise CellPuzzlesError(f"unknown decoding mode {mode!r}; use free or constrained")
        results[mode] = score_mode(test, completions, out_dir, name, mode, seed)
    return results


def score_mode(test: Sequence[Puzzle], completions: Sequence[str], out_dir: str | os.PathLike | None, name: str,
               mode: str, seed: int = 0) -> dict:
    """Score one decoding mode's completions; with ``out_dir``, write ``predictions_<name>_<mode>.jsonl``
    and ``metrics_<name>_<mode>.json`` (a local model and an endpoint write the same files)."""
    result = score_puzzles(test, completions, seed=seed)
    if out_dir is not None:
        out = Path(out_dir)
        write_predictions(out / f"predictions_{name}_{mode}.jsonl", test, completions)
        atomic.write_json(out / f"metrics_{name}_{mode}.json", result)
    return result

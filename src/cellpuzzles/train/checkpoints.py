"""Finding the checkpoint a training run resumes from (``<out>.ckpt/checkpoint-N``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cellpuzzles.core.errors import CellPuzzlesError

WEIGHTS = ("model*.safetensors", "adapter_model.*", "pytorch_model*.bin")


def latest_checkpoint(ckpt: Path, needs: Sequence[str] = ("trainer_state.json",), *,
                      skip_incomplete: bool = False, what: str = "checkpoint") -> tuple[Path, int] | None:
    """The newest ``checkpoint-N`` folder under ``ckpt`` holding weights and every file in
    ``needs``, with its step N; None when ``ckpt`` holds no checkpoint.

    An incomplete newest checkpoint is a CellPuzzlesError (a corrupt checkpoint is a clear
    error, not a silent restart), unless ``skip_incomplete``: then the newest complete one is
    taken, and only a folder without any complete ``what`` is an error."""
    found = []
    for p in ckpt.glob("checkpoint-*") if ckpt.is_dir() else []:
        tail = p.name.split("-")[-1]
        if tail.isdigit():
            found.append((int(tail), p))
    for step, p in sorted(found, reverse=True):
        if any(next(p.glob(w), None) for w in WEIGHTS) and all((p / n).is_file() for n in needs):
            return p, step
        if not skip_incomplete:
            raise CellPuzzlesError(f"{p}: {what} is incomplete or corrupt; delete it to resume from the previous one")
    if found:
        raise CellPuzzlesError(f"{ckpt}: no complete {what} (weights, {', '.join(needs)} in one checkpoint-N); "
                               "delete the folder to start again")
    return None

"""The options of ``annotate`` (one dataclass: the Python API and the CLI read the same
defaults) and the assignment rule's parser."""

from __future__ import annotations

import math
from dataclasses import dataclass

from cellpuzzles.core.errors import CellPuzzlesError
from cellpuzzles.core.options import option

MODES = ("constrained", "free")
ONE_TO_ONE, INDEPENDENT, CAPACITY = "one-to-one", "independent", "capacity"


@dataclass
class AnnotateOptions:
    """How groups become puzzles, how they are answered and how types are assigned."""

    groupby: str = option("leiden", "obs column holding the groups (clusters) to annotate")
    donor_key: str | None = option(None, "obs column naming each cell's donor or sample "
                                         "(default: donor_id, or its --map column, when present; else one donor)")
    mode: str = option("constrained", "constrained: score every candidate at every slot; free: the model's own text",
                       choices=MODES)
    top_k: int | None = option(None, "genes describing each group (default: the model's genes per cell, else 50)")
    assignment: str | None = option(None, "one-to-one, capacity=K (each type takes at most K groups) or independent "
                                          "(default: one-to-one when groups <= candidates, "
                                          "else capacity=ceil(groups/candidates))")
    max_groups: int | None = option(None, "most groups in one puzzle (default: the largest N the pipeline trains on, "
                                          "capped by the number of candidates)")
    batch_size: int = option(8, "puzzles per request to the endpoint")
    concurrency: int = option(2, "requests to the endpoint in flight at once")
    retries: int = option(4, "retries of a request answered 429 or 5xx (exponential backoff)")
    timeout_s: float = option(300.0, "seconds to wait for one request to the endpoint", flag="--timeout")
    progress: bool = option(True, "show progress over donors")

    def check(self) -> None:
        if self.mode not in MODES:
            raise CellPuzzlesError(f"mode {self.mode!r}: choose one of {', '.join(MODES)}")
        for name in ("top_k", "max_groups", "batch_size", "concurrency"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise CellPuzzlesError(f"--{name.replace('_', '-')} {v}: must be at least 1")
        if self.max_groups is not None and self.max_groups < 2:
            raise CellPuzzlesError(f"--max-groups {self.max_groups}: a puzzle needs at least 2 groups")
        if self.retries < 0 or self.timeout_s <= 0:
            raise CellPuzzlesError("--retries must be >= 0 and --timeout > 0")
        if self.assignment is not None:
            parse_assignment(self.assignment)


@dataclass(frozen=True)
class Assignment:
    """The assignment rule: ``kind`` is one-to-one, capacity or independent; ``capacity`` the
    most groups one candidate takes (1 for one-to-one, None for independent)."""

    kind: str
    capacity: int | None

    @property
    def name(self) -> str:
        return f"{CAPACITY}={self.capacity}" if self.kind == CAPACITY else self.kind


def parse_assignment(text: str) -> Assignment:
    t = text.strip().lower()
    if t == ONE_TO_ONE:
        return Assignment(ONE_TO_ONE, 1)
    if t == INDEPENDENT:
        return Assignment(INDEPENDENT, None)
    key, sep, value = t.partition("=")
    if key == CAPACITY and sep:
        try:
            k = int(value)
        except ValueError:
            k = 0
        if k >= 1:
            return Assignment(CAPACITY, k) if k > 1 else Assignment(ONE_TO_ONE, 1)
    raise CellPuzzlesError(f"--assignment {text!r}: choose one-to-one, independent or capacity=K with K >= 1 (e.g. capacity=2)")


def default_assignment(n_groups: int, n_candidates: int) -> Assignment:
    """One-to-one when every group can take its own type, else the smallest capacity that holds them."""
    if n_groups <= n_candidates:
        return Assignment(ONE_TO_ONE, 1)
    return Assignment(CAPACITY, math.ceil(n_groups / n_candidates))

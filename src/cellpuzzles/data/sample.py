"""Puzzle sampling and leakage-free splits.

Cells are grouped by donor (and batch when the file has one). A puzzle takes N distinct
types from one group and one cell per type. Splits keep test cells away from training:
``cells`` (default) puts a share of every (group, type)'s cells in a test pool that no
train puzzle may use; ``donor`` holds out whole donors. An optional ``reasoning`` split
(for SFT) is carved from the train puzzles. Same cells + same options = same puzzles.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from cellpuzzles.core import atomic
from cellpuzzles.core.errors import CellPuzzlesError
from cellpuzzles.task.puzzle import CONTEXT_FIELDS, Puzzle, make_puzzle, write_puzzles
from cellpuzzles.data.cells import Cells
from cellpuzzles.data.options import PuzzleOptions
from cellpuzzles.data.validate import MIN_TYPES, group_key


def _usable(obs: pd.DataFrame) -> pd.Series:
    return obs["donor_id"].notna() & obs["cell_type"].notna()


def split_pools(obs: pd.DataFrame, opt: PuzzleOptions, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask: True for cells in the test pool."""
    is_test = np.zeros(len(obs), dtype=bool)
    ok = _usable(obs).to_numpy()
    if opt.split_by == "donor":
        donors = np.array(sorted(obs.loc[ok, "donor_id"].unique()))
        if len(donors) < 2:
            raise CellPuzzlesError(f"--split-by donor needs at least 2 donors, the data has {len(donors)}; use --split-by cells")
        n_test = min(len(donors) - 1, max(1, round(opt.test_fraction * len(donors))))
        held = set(rng.permutation(donors)[:n_test])
        return ok & obs["donor_id"].isin(held).to_numpy()
    keys = group_key(obs).astype(str) + "\x00" + obs["cell_type"].astype(str)
    for _, rows in sorted(pd.Series(np.arange(len(obs)))[ok].groupby(keys[ok]).groups.items()):
        rows = rng.permutation(np.asarray(rows))
        if len(rows) < 2:
            continue  # a lone cell stays in train
        k = min(len(rows) - 1, max(1, round(opt.test_fraction * len(rows))))
        is_test[rows[:k]] = True
    return is_test


def _groups(obs: pd.DataFrame, mask: np.ndarray) -> list[tuple[str, list[str], list[np.ndarray]]]:
    """(group, sorted types, cell rows per type) for the cells in ``mask``."""
    sub = obs[mask & _usable(obs).to_numpy()]
    out = []
    key = group_key(sub).astype(str)
    for g, idx in sorted(sub.groupby(key).groups.items()):
        types = sub.loc[idx, "cell_type"]
        by_type = types.groupby(types).groups
        names = sorted(by_type)
        out.append((g, names, [np.asarray(by_type[t]) for t in names]))
    return out


def _context(obs: pd.DataFrame, rows: np.ndarray) -> dict[str, str]:
    ctx = {}
    for f in CONTEXT_FIELDS:
        vals = sorted({str(v) for v in obs[f].iloc[rows]}) if f in obs else ["unknown"]
        ctx[f] = ", ".join(vals)
    return ctx


def sample(cells: Cells, mask: np.ndarray, n_values: list[int], per_n: int, rng: np.random.Generator) -> list[Puzzle]:
    """Up to ``per_n`` distinct puzzles for each N, drawn from the cells in ``mask``."""
    obs = cells.obs
    groups = _groups(obs, mask)
    puzzles: list[Puzzle] = []
    for n in n_values:
        eligible = [g for g in groups if len(g[1]) >= n]
        if not eligible:
            continue
        seen: set[tuple[int, ...]] = set()
        tries = 0
        while len(seen) < per_n and tries < per_n * 20:
            tries += 1
            _, names, rows_by_type = eligible[rng.integers(len(eligible))]
            picks = rng.choice(len(names), size=n, replace=False)
            rows = np.array([rows_by_type[t][rng.integers(len(rows_by_type[t]))] for t in picks])
            key = tuple(sorted(rows.tolist()))
            if key in seen:
                continue
            seen.add(key)
            puzzles.append(
                make_puzzle(
                    genes=cells.gene_lists(rows),
                    types=[names[t] for t in picks],
                    context=_context(obs, rows),
                    donor_id=str(obs["donor_id"].iloc[rows[0]]),
                    cell_ids=[str(c) for c in obs["cell_id"].iloc[rows]],
                )
            )
    return puzzles


def _max_types(obs: pd.DataFrame, mask: np.ndarray) -> int:
    return max((len(g[1]) for g in _groups(obs, mask)), default=0)


def make_splits(cells: Cells, opt: PuzzleOptions) -> tuple[dict[str, list[Puzzle]], dict]:
    """Sample train/test(/reasoning) puzzles; returns the splits and a summary."""
    opt.check()
    rng = np.random.default_rng(opt.seed)
    obs = cells.obs
    is_test = split_pools(obs, opt, rng)
    usable = _usable(obs).to_numpy()
    pools = {"train": usable & ~is_test, "test": is_test}
    wanted = list(range(opt.n_min, opt.n_max + 1))
    limit = min(_max_types(obs, pools["train"]), _max_types(obs, pools["test"]))
    n_values = [n for n in wanted if n <= limit]
    if not n_values:
        raise CellPuzzlesError(
            f"N range {opt.n_min}-{opt.n_max} is impossible for this data: the largest donor group has "
            f"{limit} type(s) in both the train and test pools (need >= {opt.n_min}); lower --n-min, "
            f"or use data with more types per donor (>= {MIN_TYPES})"
        )
    splits = {
        "train": sample(cells, pools["train"], n_values, opt.train_per_n, rng),
        "test": sample(cells, pools["test"], n_values, opt.test_per_n, rng),
    }
    if opt.reasoning_fraction > 0:
        order = rng.permutation(len(splits["train"]))
        k = int(round(opt.reasoning_fraction * len(order)))
        splits["reasoning"] = [splits["train"][i] for i in sorted(order[:k])]
        splits["train"] = [splits["train"][i] for i in sorted(order[k:])]
    for name, ps in splits.items():
        if not ps:
            raise CellPuzzlesError(f"the {name} split came out empty; use more data, a lower --test-fraction or --split-by cells")
    _check_no_leak(splits)
    summary = {
        "options": asdict(opt),
        "n_values": n_values,
        "skipped_n": [n for n in wanted if n not in n_values],
        "pool_cells": {k: int(v.sum()) for k, v in pools.items()},
        "splits": {
            name: {
                "puzzles": len(ps),
                "by_n": dict(sorted(Counter(p.n for p in ps).items())),
                "by_donor": dict(sorted(Counter(p.donor_id for p in ps).items())),
                "cells": len({c for p in ps for c in p.cell_ids}),
            }
            for name, ps in splits.items()
        },
    }
    return splits, summary


def _check_no_leak(splits: dict[str, list[Puzzle]]) -> None:
    train_cells = {c for name in ("train", "reasoning") for p in splits.get(name, []) for c in p.cell_ids}
    leaked = train_cells & {c for p in splits["test"] for c in p.cell_ids}
    if leaked:  # a bug, not a user error
        raise AssertionError(f"{len(leaked)} test cells also appear in training puzzles")


def write_splits(out_dir: str | os.PathLike, splits: dict[str, list[Puzzle]], summary: dict) -> Path:
    """Write ``<split>.jsonl`` files and ``summary.json`` (last, with file hashes: the
    marker that the set is complete)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").unlink(missing_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".puzzles.", dir=out))
    try:
        files = {}
        for name, ps in splits.items():
            write_puzzles(tmp / f"{name}.jsonl", ps)
            files[name] = {"path": f"{name}.jsonl", "sha256": _sha256(tmp / f"{name}.jsonl")}
        for name in splits:
            os.replace(tmp / f"{name}.jsonl", out / f"{name}.jsonl")
        for stale in ("reasoning",):
            if stale not in splits:
                (out / f"{stale}.jsonl").unlink(missing_ok=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    atomic.write_json(out / "summary.json", {**summary, "files": files})
    return out


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()

"""The serving request and response: one instance in, one answer out.

An instance (V1 ``instances[i]``; V2: one JSON string per element of a BYTES input)::

    {"context": {"sex": "female", "tissue": "blood", ...}   # or the context sentence
     "cells": [{"id": "c1", "genes": ["CD3D", "IL7R", ...]},          # ranked genes, or
               {"id": "c2", "expression": {"CD3D": 2.1, "MS4A1": 0.3}}], # raw values -> top K
     "candidates": ["B cell", "T cell"],
     "mode": "constrained" | "free"}                          # optional

Each becomes a :class:`cellpuzzles.task.puzzle.Puzzle` through ``make_puzzle``-compatible fields
(candidates sorted, the public prompt layout), so the prompt has one definition.
A prediction::

    {"assignments": {"c1": "T cell", ...} | null, "answer": [...] | null, "valid": bool,
     "reason": null | "why the answer is not valid", "reasoning": "<think> text",
     "completion": "raw model text", "mode": "constrained" | "free",
     "unknown_candidates": [names the model never saw] | null (its tokenizer cannot tell),
     "warning": "..."}                                        # only with unknown candidates

Errors are :class:`RequestError` with the field path in the message (HTTP 400).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cellpuzzles.task.puzzle import CONTEXT_FIELDS, Puzzle, context_sentence, extract_answer, is_well_formed, split_labels

MODEL_NAME = "cellpuzzles"  # the name on every route (/v1/models/cellpuzzles:predict, ...)
MODES = ("constrained", "free")
DEFAULT_TOP_K = 50


class RequestError(ValueError):
    """A request the client must fix; the message names the field."""


# text the prompt format cannot carry inside a candidate name: the answer separator (labels are
# split on "|"), line breaks (one candidate per line) and the format's tags
FORBIDDEN_IN_NAMES = ("|", "\n", "\r", "<think>", "</think>", "<answer>", "</answer>")


@dataclass
class Limits:
    """What one request may hold (ServeOptions sets them; 400 naming the limit above them)."""

    max_cells: int = 30
    top_k: int = DEFAULT_TOP_K  # genes kept from raw expression (the model's genes per cell)
    max_instances: int | None = None  # per request (None: no limit)
    max_genes: int | None = None  # per cell, ranked list or expression map (None: no limit)


@dataclass
class Instance:
    puzzle: Puzzle  # candidates sorted; answer unknown (a placeholder copy of the candidates)
    cell_ids: list[str]
    mode: str


def top_genes(expression: dict, k: int, where: str) -> list[str]:
    """Top-K genes of one cell from gene -> value: descending value, ties by gene name."""
    if not isinstance(expression, dict) or not expression:
        raise RequestError(f"{where}: expected a non-empty object of gene -> number")
    items = []
    for g, v in expression.items():
        if not g.strip():
            raise RequestError(f"{where}: empty gene name")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise RequestError(f"{where}.{g}: expected a finite number, got {v!r}")
        items.append((-float(v), g))
    return [g for _, g in sorted(items)[:k]]


def _context(raw, where: str) -> str:
    if raw is None:
        raise RequestError(f"{where}: missing; give the donor fields ({', '.join(CONTEXT_FIELDS)}) or a context sentence")
    if isinstance(raw, str):
        if not raw.strip():
            raise RequestError(f"{where}: empty sentence")
        return raw.strip()
    if not isinstance(raw, dict):
        raise RequestError(f"{where}: expected an object of donor fields or a sentence")
    for k, v in raw.items():
        if k not in CONTEXT_FIELDS:
            raise RequestError(f"{where}.{k}: unknown field; use {', '.join(CONTEXT_FIELDS)}")
        if v is not None and not isinstance(v, str):
            raise RequestError(f"{where}.{k}: expected a string")
    return context_sentence(raw)


def _genes(cell: dict, where: str, limits: Limits) -> list[str]:
    has_genes, has_expr = "genes" in cell, "expression" in cell
    if has_genes == has_expr:
        raise RequestError(f"{where}: give exactly one of 'genes' (ranked list) or 'expression' (gene -> value)")
    field = "expression" if has_expr else "genes"
    n = len(cell[field]) if isinstance(cell[field], (list, dict)) else 0
    if limits.max_genes is not None and n > limits.max_genes:
        raise RequestError(f"{where}.{field}: {n} genes is above the limit of {limits.max_genes} (--max-genes); "
                           "send the top-ranked genes only")
    if has_expr:
        return top_genes(cell["expression"], limits.top_k, f"{where}.expression")
    genes = cell["genes"]
    if not isinstance(genes, list) or not genes:
        raise RequestError(f"{where}.genes: expected a non-empty list of gene names")
    for j, g in enumerate(genes):
        if not isinstance(g, str) or not g.strip():
            raise RequestError(f"{where}.genes[{j}]: expected a non-empty string, got {g!r}")
    return [g.strip() for g in genes]


def parse_instance(raw, where: str, limits: Limits, default_mode: str) -> Instance:
    """Validate one instance and build its puzzle; RequestError names the bad field."""
    if not isinstance(raw, dict):
        raise RequestError(f"{where}: expected an object with context, cells and candidates")
    mode = raw.get("mode", default_mode)
    if mode not in MODES:
        raise RequestError(f"{where}.mode: {mode!r} is not one of {', '.join(MODES)}")
    context = _context(raw.get("context"), f"{where}.context")
    cells, cands = raw.get("cells"), raw.get("candidates")
    if not isinstance(cells, list) or not cells:
        raise RequestError(f"{where}.cells: missing or empty; give a list of cells")
    if not isinstance(cands, list) or not cands:
        raise RequestError(f"{where}.candidates: missing or empty; give a list of candidate types")
    if len(cells) > limits.max_cells:
        raise RequestError(f"{where}.cells: {len(cells)} cells is above the limit of {limits.max_cells}")
    if len(cells) < 2:
        raise RequestError(f"{where}.cells: a puzzle needs at least 2 cells")
    if len(cands) != len(cells):
        raise RequestError(f"{where}.candidates: {len(cands)} candidates for {len(cells)} cells; give one per cell")
    seen: dict[str, int] = {}
    for j, c in enumerate(cands):
        if not isinstance(c, str) or not c.strip():
            raise RequestError(f"{where}.candidates[{j}]: expected a non-empty string")
        bad = next((x for x in FORBIDDEN_IN_NAMES if x in c), None)
        if bad is not None:
            raise RequestError(f"{where}.candidates[{j}]: contains {bad!r}, which the answer format cannot carry "
                               "(labels are separated by '|', one candidate per line, <think>/<answer> tags); "
                               "rename the candidate")
        key = c.strip().lower()
        if key in seen:
            raise RequestError(f"{where}.candidates[{j}]: duplicate of candidates[{seen[key]}] ({c!r})")
        seen[key] = j
    genes, ids = [], []
    for i, cell in enumerate(cells):
        w = f"{where}.cells[{i}]"
        if not isinstance(cell, dict):
            raise RequestError(f"{w}: expected an object with 'id' and 'genes' or 'expression'")
        cid = cell.get("id", f"cell{i + 1}")
        if not isinstance(cid, str) or not cid:
            raise RequestError(f"{w}.id: expected a non-empty string")
        if cid in ids:
            raise RequestError(f"{w}.id: duplicate cell id {cid!r}")
        ids.append(cid)
        genes.append(_genes(cell, w, limits))
    candidates = sorted(c.strip() for c in cands)
    puzzle = Puzzle(genes=genes, candidates=candidates, answer=list(candidates), context=context, cell_ids=ids)
    return Instance(puzzle=puzzle, cell_ids=ids, mode=mode)


def parse_instances(body, limits: Limits, default_mode: str) -> list[Instance]:
    """A V1 body ``{"instances": [...], "mode": ...}`` into instances."""
    if not isinstance(body, dict):
        raise RequestError("body: expected a JSON object with 'instances'")
    mode = body.get("mode", default_mode)
    if mode not in MODES:
        raise RequestError(f"mode: {mode!r} is not one of {', '.join(MODES)}")
    instances = body.get("instances")
    if not isinstance(instances, list) or not instances:
        raise RequestError("instances: missing or empty; send {\"instances\": [{context, cells, candidates}, ...]}")
    check_count(len(instances), "instances", limits)
    return [parse_instance(x, f"instances[{i}]", limits, mode) for i, x in enumerate(instances)]


def check_count(n: int, where: str, limits: Limits) -> None:
    if limits.max_instances is not None and n > limits.max_instances:
        raise RequestError(f"{where}: {n} instances is above the limit of {limits.max_instances} per request "
                           "(--max-instances); split them over several requests")


@dataclass
class CompletionCheck:
    """Whether a completion is a valid answer to a puzzle, and if not, why."""

    labels: list[str] | None  # the labels as the model wrote them (None: no answer found)
    valid: bool
    reason: str | None


def check_completion(puzzle: Puzzle, completion: str) -> CompletionCheck:
    """Is the completion a valid one-to-one answer to the puzzle? (format rule, count,
    every candidate exactly once, case-insensitive like the reward). Never repairs it."""
    text = extract_answer(completion)
    labels = split_labels(text) if text is not None else None
    if labels is None:
        return CompletionCheck(None, False, "no answer found in the completion")
    if not is_well_formed(completion):
        return CompletionCheck(labels, False, "the completion breaks the <think>…</think>\\n<answer>…</answer> format")
    if len(labels) != puzzle.n:
        return CompletionCheck(labels, False, f"{len(labels)} labels for {puzzle.n} cells")
    canon = {c.lower(): c for c in puzzle.candidates}
    unknown = [x for x in labels if x.lower() not in canon]
    if unknown:
        return CompletionCheck(labels, False, f"labels not among the candidates: {', '.join(unknown[:3])}")
    if len({x.lower() for x in labels}) != len(labels):
        return CompletionCheck(labels, False, "a candidate is used more than once")
    return CompletionCheck([canon[x.lower()] for x in labels], True, None)


def reasoning_of(completion: str) -> str:
    """The text inside <think>…</think> (or before <answer> when the tag is not closed)."""
    from cellpuzzles.task.puzzle import think_part

    return think_part(completion).strip()


def prediction(inst: Instance, answer_text: str, mode: str, completion: str | None = None, **extra) -> dict:
    """The response object for one instance. ``answer_text`` is the completion checked (in
    constrained mode the assigned one); ``completion`` the model's own raw text."""
    raw = answer_text if completion is None else completion
    check = check_completion(inst.puzzle, answer_text)
    out = {
        "assignments": dict(zip(inst.cell_ids, check.labels)) if check.valid else None,
        "answer": check.labels,
        "valid": check.valid,
        "reason": check.reason,
        "reasoning": reasoning_of(raw),
        "completion": raw,
        "mode": mode,
    }
    out.update(extra)
    return out

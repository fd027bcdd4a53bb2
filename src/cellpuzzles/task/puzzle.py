"""The CellPuzzles record: one definition of the prompt text, the answer text and their parsing.

A puzzle is N cells from one donor and N candidate types; each candidate is the
type of exactly one cell. Records follow the public CellPuzzles schema
(``system_msg``, ``user_msg``, ``assistant_msg``) plus structured fields.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cellpuzzles.core.errors import CellPuzzlesError
from cellpuzzles.core.records import read_jsonl, write_jsonl

# Verbatim system message of every public CellPuzzles record (models trained on it expect it).
SYSTEM_MSG = (
    "You are an expert assistant specialized in cell type annotation. You will be given a batch of N "
    "cells from the same donor, where each cell represents a unique cell type. For each cell, the top "
    "expressed genes are provided in descending order of expression. Using both the gene expression data "
    "and donor information, determine the correct cell type for each cell. You will also receive a list "
    "of N candidate cell types, and each candidate must be assigned to exactly one cell. Ensure that you "
    "consider all cells and candidate types together, rather than annotating each cell individually. "
    "Include your detailed reasoning within <think> and </think> tags, and provide your final answer "
    "within <answer> and </answer> tags. The final answer should be a single string listing the assigned "
    "cell types in order, separated by ' | '."
)

ANSWER_SEP = " | "
MATCH_LINE = "Match the cells above to one of the following cell types:"
CONTEXT_FIELDS = ("sex", "development_stage", "self_reported_ethnicity", "tissue", "disease")
_CELL_LINE = re.compile(r"^Cell (\d+): ?(.*)$")


def context_sentence(context: dict[str, str]) -> str:
    """The donor context as one sentence; unknown fields stay visible as 'unknown'."""
    get = lambda k: str(context.get(k) or "unknown")  # noqa: E731
    return (
        f"The cells come from one donor. Sex: {get('sex')}; development stage: {get('development_stage')}; "
        f"self-reported ethnicity: {get('self_reported_ethnicity')}; tissue: {get('tissue')}; disease: {get('disease')}."
    )


_CONTEXT_RE = re.compile(
    r"^The cells come from one donor\. Sex: (?P<sex>.*); development stage: (?P<development_stage>.*); "
    r"self-reported ethnicity: (?P<self_reported_ethnicity>.*); tissue: (?P<tissue>.*); disease: (?P<disease>.*)\.$"
)


def parse_context(sentence: str) -> dict[str, str]:
    """Fields of a sentence written by :func:`context_sentence`; {} for any other sentence."""
    m = _CONTEXT_RE.match(sentence)
    return dict(m.groupdict()) if m else {}


@dataclass
class Puzzle:
    """One CellPuzzles item. ``answer[i]`` is the type of ``genes[i]``'s cell."""

    genes: list[list[str]]
    candidates: list[str]
    answer: list[str]
    context: str
    puzzle_id: str = ""
    donor_id: str = ""
    cell_ids: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.genes)

    def __post_init__(self) -> None:
        if not self.cell_ids:
            self.cell_ids = [f"cell{i + 1}" for i in range(len(self.genes))]
        if not self.puzzle_id:
            self.puzzle_id = hashlib.sha1(self.user_msg.encode()).hexdigest()[:16]

    @property
    def user_msg(self) -> str:
        cells = "\n".join(f"Cell {i + 1}: {', '.join(g)}" for i, g in enumerate(self.genes))
        return f"Context: {self.context}\n\n{cells}\n\n{MATCH_LINE}\n" + "\n".join(self.candidates)

    @property
    def answer_text(self) -> str:
        return ANSWER_SEP.join(self.answer)

    def messages(self) -> list[dict[str, str]]:
        """Chat messages for a model prompt (system + user)."""
        return [{"role": "system", "content": SYSTEM_MSG}, {"role": "user", "content": self.user_msg}]

    def to_record(self) -> dict:
        return {
            "system_msg": SYSTEM_MSG,
            "user_msg": self.user_msg,
            "assistant_msg": self.answer_text,
            "puzzle_id": self.puzzle_id,
            "donor_id": self.donor_id,
            "n": self.n,
            "cell_ids": list(self.cell_ids),
            "genes": [list(g) for g in self.genes],
            "candidates": list(self.candidates),
            "answer": list(self.answer),
        }


def make_puzzle(
    genes: Sequence[Sequence[str]],
    types: Sequence[str],
    context: dict[str, str] | str,
    donor_id: str = "",
    cell_ids: Sequence[str] = (),
) -> Puzzle:
    """Build a puzzle in the public layout: candidates sorted, answer in cell order."""
    sentence = context if isinstance(context, str) else context_sentence(context)
    ids = list(cell_ids)
    pid = ""
    if ids:
        pid = hashlib.sha1(("|".join([donor_id, *ids])).encode()).hexdigest()[:16]
    return Puzzle(
        genes=[list(g) for g in genes],
        candidates=sorted(types),
        answer=list(types),
        context=sentence,
        puzzle_id=pid,
        donor_id=donor_id,
        cell_ids=ids,
    )


def parse_user_msg(user_msg: str) -> tuple[str, list[list[str]], list[str]]:
    """Context sentence, genes per cell and candidates from a CellPuzzles ``user_msg``."""
    head, sep, tail = user_msg.partition(f"\n\n{MATCH_LINE}\n")
    if not sep:
        raise ValueError(f"user_msg lacks the line '{MATCH_LINE}'")
    candidates = [c for c in tail.split("\n") if c.strip()]
    ctx_part, sep, cells_part = head.partition("\n\n")
    if not sep or not ctx_part.startswith("Context: "):
        raise ValueError("user_msg must start with 'Context: <sentence>' followed by a blank line")
    genes: list[list[str]] = []
    for k, line in enumerate(cells_part.split("\n"), start=1):
        m = _CELL_LINE.match(line)
        if not m or int(m.group(1)) != k:
            raise ValueError(f"expected 'Cell {k}: GENE, GENE, ...', got {line[:60]!r}")
        genes.append([g for g in m.group(2).split(", ")] if m.group(2) else [])
    if len(candidates) != len(genes):
        raise ValueError(f"{len(genes)} cells but {len(candidates)} candidate types")
    return ctx_part[len("Context: "):], genes, candidates


def puzzle_from_record(rec: dict) -> Puzzle:
    """Parse a record: ours (structured fields) or a public one (only the three messages)."""
    for key in ("user_msg", "assistant_msg"):
        if not isinstance(rec.get(key), str):
            raise ValueError(f"missing string field '{key}'")
    context, genes, candidates = parse_user_msg(rec["user_msg"])
    answer_text = rec["assistant_msg"]
    if "<answer>" in answer_text:  # a reasoning record: the answer sits inside the tags
        answer_text = extract_answer(answer_text) or ""
    answer = rec.get("answer") or [a.strip() for a in answer_text.split("|")]
    if len(answer) != len(genes):
        raise ValueError(f"{len(genes)} cells but the answer lists {len(answer)} types")
    if sorted(a.lower() for a in answer) != sorted(c.lower() for c in candidates):
        raise ValueError("the answer is not a permutation of the candidate types")
    if rec.get("genes") is not None and rec["genes"] != genes:
        raise ValueError("structured 'genes' disagree with user_msg")
    return Puzzle(
        genes=genes,
        candidates=candidates,
        answer=list(answer),
        context=context,
        puzzle_id=str(rec.get("puzzle_id") or ""),
        donor_id=str(rec.get("donor_id") or ""),
        cell_ids=list(rec.get("cell_ids") or []),
    )


def read_puzzles(path: str | os.PathLike) -> list[Puzzle]:
    """Read CellPuzzles JSONL (or a JSON list); errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise CellPuzzlesError(f"{path}: puzzle file not found; run `cellpuzzles puzzles` first or check the path")
    if _first_char(path) == "[":
        try:
            items = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise CellPuzzlesError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); fix the file") from None
        numbered = enumerate(items, start=1)
        where = "item"
    else:
        numbered = read_jsonl(path)
        where = "line"
    puzzles = []
    for k, rec in numbered:
        if not isinstance(rec, dict):
            raise CellPuzzlesError(f"{path}: {where} {k}: expected a JSON object with system_msg/user_msg/assistant_msg")
        try:
            puzzles.append(puzzle_from_record(rec))
        except ValueError as e:
            raise CellPuzzlesError(f"{path}: {where} {k}: {e}") from None
    if not puzzles:
        raise CellPuzzlesError(f"{path}: no puzzles in the file; it is empty")
    return puzzles


def _first_char(path: Path) -> str:
    """The file's first non-whitespace character ('' for a blank file)."""
    with open(path, encoding="utf-8") as fh:
        while chunk := fh.read(1 << 16):
            if chunk.strip():
                return chunk.lstrip()[0]
    return ""


def write_puzzles(path: str | os.PathLike, puzzles: Iterable[Puzzle]) -> int:
    return write_jsonl(path, (p.to_record() for p in puzzles))


# ---- completions: the format rule and the answer extraction (Cell-o1 definitions) ----

_FORMAT_RE = re.compile(r"^<think>.*?</think>\n<answer>.*?</answer>$", re.DOTALL)


def extract_answer(completion: str) -> str | None:
    """The answer text: after ``<answer>`` on the first line holding it (minus a trailing
    ``</answer>``); else the first line containing ``|``; else None."""
    lines = completion.split("\n")
    for line in lines:
        if "<answer>" in line:
            text = line.split("<answer>", 1)[1]
            if text.endswith("</answer>"):
                text = text[: -len("</answer>")]
            return text
    for line in lines:
        if "|" in line:
            return line
    return None


def is_well_formed(completion: str) -> bool:
    """The Cell-o1 format rule: one of each tag, think-then-answer layout, a '|' in the answer."""
    if any(completion.count(t) != 1 for t in ("<think>", "</think>", "<answer>", "</answer>")):
        return False
    if not _FORMAT_RE.match(completion):
        return False
    answer = extract_answer(completion)
    return answer is not None and "|" in answer


def split_labels(answer_text: str) -> list[str]:
    return [a.strip() for a in answer_text.split("|")]


def format_completion(think: str, labels: Sequence[str]) -> str:
    """A completion that obeys the format rule."""
    return f"<think>{think}</think>\n<answer>{ANSWER_SEP.join(labels)}</answer>"


def think_part(completion: str) -> str:
    """The model's reasoning as a well-formed ``<think>…</think>`` block."""
    if "</think>" in completion:
        body = completion.split("</think>", 1)[0]
    else:
        body = completion.split("<answer>", 1)[0]
    body = body.split("<think>", 1)[1] if "<think>" in body else body
    return body.replace("<think>", "").replace("<answer>", "").replace("</answer>", "")

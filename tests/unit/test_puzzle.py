"""The CellPuzzles record: layout, round trips, import of public-style records."""

import json

import pytest

from cellpuzzles.core.errors import CellPuzzlesError
from cellpuzzles.task.puzzle import (
    SYSTEM_MSG,
    Puzzle,
    context_sentence,
    make_puzzle,
    parse_context,
    parse_user_msg,
    puzzle_from_record,
    read_puzzles,
    write_puzzles,
)

CTX = {"sex": "female", "development_stage": "45-year-old stage", "self_reported_ethnicity": "European",
       "tissue": "lung", "disease": "normal"}


def sample_puzzle() -> Puzzle:
    return make_puzzle(genes=[["CD3E", "CD2"], ["MS4A1", "CD79A"], ["LYZ", "CD14"]],
                       types=["T cell", "B cell", "monocyte"], context=CTX, donor_id="d1", cell_ids=["a", "b", "c"])


def test_system_message_is_the_public_one():
    assert SYSTEM_MSG.startswith("You are an expert assistant specialized in cell type annotation.")
    assert SYSTEM_MSG.endswith("separated by ' | '.")
    assert "\n" not in SYSTEM_MSG


def test_record_layout():
    p = sample_puzzle()
    rec = p.to_record()
    assert rec["system_msg"] == SYSTEM_MSG
    assert rec["user_msg"] == (
        f"Context: {context_sentence(CTX)}\n\n"
        "Cell 1: CD3E, CD2\nCell 2: MS4A1, CD79A\nCell 3: LYZ, CD14\n\n"
        "Match the cells above to one of the following cell types:\nB cell\nT cell\nmonocyte"
    )
    assert rec["assistant_msg"] == "T cell | B cell | monocyte"
    assert rec["candidates"] == sorted(rec["answer"])
    assert rec["n"] == 3 and rec["cell_ids"] == ["a", "b", "c"] and rec["donor_id"] == "d1"


def test_context_sentence_parses_back():
    assert parse_context(context_sentence(CTX)) == CTX
    assert parse_context("something else") == {}


def test_export_import_round_trip(tmp_path):
    ps = [sample_puzzle(), make_puzzle([["A"], ["B"], ["C"]], ["x", "y", "z"], "Free text context.")]
    write_puzzles(tmp_path / "p.jsonl", ps)
    back = read_puzzles(tmp_path / "p.jsonl")
    assert [b.to_record() for b in back] == [p.to_record() for p in ps]
    write_puzzles(tmp_path / "q.jsonl", back)
    assert (tmp_path / "p.jsonl").read_bytes() == (tmp_path / "q.jsonl").read_bytes()


def test_import_public_record_with_only_messages(tmp_path):
    p = sample_puzzle()
    public = {"system_msg": SYSTEM_MSG, "user_msg": p.user_msg, "assistant_msg": p.answer_text}
    q = puzzle_from_record(public)
    assert q.genes == p.genes and q.candidates == p.candidates and q.answer == p.answer and q.context == p.context
    # a reasoning record: answer inside tags
    reasoning = dict(public, assistant_msg=f"<think>because</think>\n<answer>{p.answer_text}</answer>")
    assert puzzle_from_record(reasoning).answer == p.answer
    # JSON list files work too
    (tmp_path / "list.json").write_text(json.dumps([public, public]))
    assert len(read_puzzles(tmp_path / "list.json")) == 2


def test_parse_user_msg_rejects_bad_layouts():
    p = sample_puzzle()
    with pytest.raises(ValueError):
        parse_user_msg(p.user_msg.replace("Match the cells", "Assign the cells"))
    with pytest.raises(ValueError):
        parse_user_msg(p.user_msg.replace("Cell 2:", "Cell 7:"))
    with pytest.raises(ValueError):
        parse_user_msg(p.user_msg + "\nextra type")


def test_malformed_lines_are_reported_with_line_numbers(tmp_path):
    good = json.dumps(sample_puzzle().to_record())
    f = tmp_path / "bad.jsonl"
    f.write_text(good + "\n{not json\n")
    with pytest.raises(CellPuzzlesError, match=r"bad.jsonl:2"):
        read_puzzles(f)
    f.write_text(good + "\n" + json.dumps({"user_msg": "hello", "assistant_msg": "x"}) + "\n")
    with pytest.raises(CellPuzzlesError, match=r"line 2"):
        read_puzzles(f)
    rec = sample_puzzle().to_record()
    rec["assistant_msg"] = "T cell | B cell | platelet"
    rec.pop("answer")
    f.write_text(json.dumps(rec) + "\n")
    with pytest.raises(CellPuzzlesError, match="permutation"):
        read_puzzles(f)
    f.write_text("\n")
    with pytest.raises(CellPuzzlesError, match="empty"):
        read_puzzles(f)

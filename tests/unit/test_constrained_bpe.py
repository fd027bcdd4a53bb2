"""Constrained decoding for cell-type names of any token length, with both models: the tiny
word-level one (one token per name) and the production-shaped one (byte-level BPE, names of
several tokens, tests/helpers/production.py). Every candidate's score is the log-likelihood a
plain forward pass gives the tokens of its name as the tokenizer encodes the finished text;
the batched path gives every puzzle the answer it gets alone."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cellpuzzles.inference.decode import constrained, constrained_many  # noqa: E402
from cellpuzzles.inference.folder import load_model  # noqa: E402
from cellpuzzles.inference.prompting import prompt_text  # noqa: E402
from cellpuzzles.inference.scaffold_batch import answer_layout, prompt_ids, scaffold_layout  # noqa: E402
from cellpuzzles.inference.slot_batch import fill_slots  # noqa: E402
from cellpuzzles.inference.slot_tails import slot_tails  # noqa: E402
from cellpuzzles.task.puzzle import extract_answer, split_labels  # noqa: E402
from cellpuzzles.task.scaffold import think_lines  # noqa: E402

from helpers.models import as_scaffold_model, build_world  # noqa: E402
from helpers.production import build_production_model  # noqa: E402

pytestmark = pytest.mark.slow  # builds two model folders

K = 3  # genes restated per scaffold line


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("cbpe")
    w = build_world(root, genes_per_cell=8, train_per_n=6, test_per_n=4)
    pairs = w["pairs"]
    prod = build_production_model([p for p, _ in pairs], [t for _, t in pairs], root / "prod", genes_per_cell=8)
    w["models"] = {"tiny": as_scaffold_model(w["folder"], root / "tiny-s", genes_per_cell=8, restated_genes=K),
                   "production": as_scaffold_model(prod, root / "prod-s", genes_per_cell=8, restated_genes=K)}
    return w


@pytest.fixture(params=["tiny", "production"])
def loaded(request, world):
    model, tok, prompt = load_model(world["models"][request.param])
    puzzles = [prompt.apply(p) for p in world["splits"]["test"][::2][:6]]
    assert len({p.n for p in puzzles}) > 1  # rows finish at different slots
    return request.param, model, tok, puzzles


def _plain_logps(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def test_names_split_as_the_tokenizer_splits_them(world):
    """The production-shaped tokenizer merges across a name's boundary; the tails follow it."""
    _, tok, prompt = load_model(world["models"]["production"])
    text = "<think>Cell 1: A, B -> "
    head, tails, _ = slot_tails(tok, text, ["CD34+", "CD19+ B", "CD4+ T", "CD4+ T Reg"], "\nCell 2: ")
    for c, t in zip(["CD34+", "CD19+ B", "CD4+ T", "CD4+ T Reg"], tails):
        full = tok(text + c + "\nCell 2: ", add_special_tokens=False)["input_ids"]
        assert full[: len(head) + len(t)] == head + t  # canonical: a prefix of the whole text's tokens
        assert tok.decode(t).strip().startswith(c.split()[0][:2])
    # 'CD34+' ends in '+\n' merged: every tail then runs through the newline's token
    assert all(tok.decode(t).endswith("\n") for t in tails)
    assert len({tuple(t) for t in tails}) == 4 and any(len(t) > 3 for t in tails)


def test_scores_are_a_plain_forward_pass_over_the_canonical_tokens(loaded):
    """Batched over puzzles and candidates (one forward per slot, the candidates' token trie
    over a shared KV cache), every score equals the plain forward pass's log-likelihood of the
    candidate's tokens in ``tok(text + candidate + following text)``; the completion's ids are
    exactly the tokenizer's encoding of the completion text."""
    kind, model, tok, puzzles = loaded
    layouts = [scaffold_layout(p, K) for p in puzzles]
    prompts = prompt_ids(tok, puzzles)
    rows = fill_slots(model, tok, prompts, layouts)
    multi = False
    for b, (p, lay, prompt, row) in enumerate(zip(puzzles, layouts, prompts, rows)):
        assert row.ids == tok(row.text, add_special_tokens=False)["input_ids"]
        assert len(row.mask) == len(row.ids) == len(row.logps)
        labels = [p.candidates[j] for j in row.chosen]
        assert row.text.startswith("<think>" + think_lines(p, K, labels) + "</think>")
        if b % 2:
            continue  # every other puzzle checked against plain forward passes (time)
        text = ""
        for i in range(p.n):
            text += lay.before(i)
            after = lay.before(i + 1) if i + 1 < p.n else lay.closing(labels)
            head, tails, _ = slot_tails(tok, text, p.candidates, after)
            for j, (c, t) in enumerate(zip(p.candidates, tails)):
                ids = prompt + tok(text + c + after, add_special_tokens=False)["input_ids"]
                at = len(prompt) + len(head)
                assert ids[at:at + len(t)] == t
                logp = _plain_logps(model, ids)
                want = sum(logp[at + k - 1, t[k]].item() for k in range(len(t)))
                assert abs(row.scores[i, j] - want) < 1e-3, (kind, i, c)
                multi |= len(t) > 1
            text += labels[i]
    assert multi == (kind == "production")


def test_batched_answers_equal_one_puzzle_at_a_time(loaded):
    kind, model, tok, puzzles = loaded
    one = [constrained(model, tok, p, "", K) for p in puzzles]
    many = constrained_many(model, tok, puzzles, [""] * len(puzzles), K, batch_size=4)
    assert many == [c for c, _ in one]
    for p, (c, scores) in zip(puzzles, one):
        assert sorted(split_labels(extract_answer(c))) == sorted(p.candidates)
        assert scores.shape == (p.n, p.n) and np.isfinite(scores).all()


def test_answer_slots_after_a_think_part(loaded):
    """Without the scaffold, the answer slots follow the model's own think part: each candidate is
    scored as ``<answer>a | b</answer>`` is tokenized, batched, the same answers alone."""
    kind, model, tok, puzzles = loaded
    thinks = [f"cell {i} looks familiar" for i in range(len(puzzles))]
    many = constrained_many(model, tok, puzzles, [f"<think>{t}</think>\n<answer>x</answer>" for t in thinks], None, 4)
    for p, t, c in zip(puzzles, thinks, many):
        assert c.startswith(f"<think>{t}</think>\n<answer>")
        assert sorted(split_labels(extract_answer(c))) == sorted(p.candidates)
        assert c == constrained(model, tok, p, f"<think>{t}</think>", None)[0]
    lay = answer_layout(puzzles[0], thinks[0])
    row = fill_slots(model, tok, prompt_ids(tok, puzzles[:1]), [lay])[0]
    assert row.ids == tok(row.text, add_special_tokens=False)["input_ids"]
    assert tok(prompt_text(tok, puzzles[0]), add_special_tokens=False)["input_ids"] == prompt_ids(tok, puzzles[:1])[0]

"""Learning pieces on real bundled data with a very small untrained model: tokenizer,
teacher traces, distillation, model folders, constrained and scaffold decoding, rollouts.
(Training runs, SFT and GRPO, are in tests/integration/test_training.py.)"""

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

from cellpuzzles.core.errors import CellPuzzlesError
from cellpuzzles.distill.teachers.base import Reply
from cellpuzzles.distill.teachers.markers import MarkersTeacher
from cellpuzzles.distill.traces import DistillOptions, distill
from cellpuzzles.inference.decode import constrained, generate
from cellpuzzles.inference.folder import PromptOptions, load_model, load_tokenizer
from cellpuzzles.inference.prompting import prompt_text
from cellpuzzles.task.puzzle import extract_answer, is_well_formed, split_labels
from cellpuzzles.task.reward import batch_reward, score
from cellpuzzles.task.scaffold import ARROW, cell_line, think_lines
from cellpuzzles.train.scaffold_rollout import sample_batch, sample_completion, scaffold_rollout

from helpers.models import as_scaffold_model, build_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Bundled data -> puzzles -> markers traces -> an untrained tiny model (10 genes per cell)."""
    return build_world(tmp_path_factory.mktemp("learn"), genes_per_cell=10, train_per_n=40, test_per_n=6)


def test_tokenizer_is_lossless_and_types_are_single_tokens(world):
    tok = load_tokenizer(world["folder"])
    p, trace = world["pairs"][0]
    p = PromptOptions(genes_per_cell=10).apply(p)  # the prompt this model sees
    chat = tok.apply_chat_template([*p.messages(), {"role": "assistant", "content": trace}], tokenize=False)
    ids = tok(chat, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == chat
    for t in p.candidates:
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1
    assert len(tok(p.messages()[0]["content"], add_special_tokens=False)["input_ids"]) == 1  # system message


def test_markers_traces_are_well_formed_and_grounded(world):
    for p, trace in world["pairs"]:
        assert is_well_formed(trace) and batch_reward(trace, p.answer_text) == 1.0
        body = trace.split("</think>")[0]
        for i, line in enumerate(body.removeprefix("<think>").split("\n")):
            assert line.startswith(cell_line(i, p.genes[i], 6))  # the scaffold: the cell's first genes, then its type
            assert line.split(ARROW, 1)[1].startswith(p.answer[i] + ": ")
            cited = line.split(ARROW, 1)[1].split(": ", 1)[1].split("; ")[0]
            if cited != "no clear markers":
                assert set(cited.split(", ")) <= set(p.genes[i]), line  # evidence comes from that cell


def test_teacher_cites_only_visible_genes_but_decides_with_all(world):
    teacher = MarkersTeacher(world["splits"]["train"], visible_genes=3)
    rewards = []
    for p in world["splits"]["reasoning"][:40]:
        trace = teacher.trace(p)
        rewards.append(batch_reward(trace, p.answer_text))
        for i, line in enumerate(trace.split("</think>")[0].removeprefix("<think>").split("\n")):
            assert line.startswith(cell_line(i, p.genes[i], 3))  # restates only what the student sees
            cited = line.split(ARROW, 1)[1].split(": ", 1)[1].split("; ")[0]
            if cited != "no clear markers":
                assert set(cited.split(", ")) <= set(p.genes[i][:3]), line
    assert sum(r == 1.0 for r in rewards) >= 30  # the answer still comes from all the genes


class FlakyTeacher:
    """Wraps the real markers teacher: attempt 0 answers with the labels reversed."""

    name = "flaky"

    def __init__(self, inner):
        self.inner = inner

    def complete_many(self, items):
        out = self.inner.complete_many(items)
        for r, (_p, a) in zip(out, items):
            if a == 0:
                labels = split_labels(extract_answer(r.text))
                r.text = r.text.split("<answer>")[0] + "<answer>" + " | ".join(labels[::-1]) + "</answer>"
        return out


def test_distill_rejection_sampling_across_attempts(world, tmp_path):
    puzzles = world["splits"]["reasoning"][:20]
    with pytest.raises(CellPuzzlesError, match="no acceptable trace"):  # every first attempt is wrong
        distill(puzzles, FlakyTeacher(world["teacher"]), DistillOptions(attempts=1), tmp_path / "a.jsonl")
    two = distill(puzzles, FlakyTeacher(world["teacher"]), DistillOptions(attempts=2), tmp_path / "b.jsonl")
    assert two["accepted"] >= 18 and two["attempts_used"] == 20 + 20
    kept = [json.loads(x) for x in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert all(r["reward"] == 1.0 for r in kept) and {r["attempt"] for r in kept} <= {0, 1}

    class Silent:
        name = "silent"

        def complete_many(self, items):
            return [Reply(p.puzzle_id, a, None, error="empty completion") for p, a in items]

    with pytest.raises(CellPuzzlesError, match="no acceptable trace"):
        distill(puzzles, Silent(), DistillOptions(), tmp_path / "c.jsonl")
    assert not (tmp_path / "c.jsonl").exists()


def test_broken_model_folders_get_clear_errors(world, tmp_path):
    bad = tmp_path / "m"
    shutil.copytree(world["folder"], bad)
    (bad / "chat_template.jinja").unlink()
    cfg = json.loads((bad / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (bad / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CellPuzzlesError, match="chat template"):
        load_tokenizer(bad)
    for f in bad.glob("tokenizer*"):
        f.unlink()
    with pytest.raises(CellPuzzlesError, match="no tokenizer"):
        load_tokenizer(bad)
    with pytest.raises(CellPuzzlesError, match="not a folder"):
        load_model(tmp_path / "nothing")


@pytest.mark.slow
def test_constrained_decoding_is_always_a_valid_permutation(world):
    model, tok, prompt = load_model(world["folder"])  # untrained: free text is garbage
    test = [prompt.apply(p) for p in world["splits"]["test"][:6]]
    free = generate(model, tok, test)
    cons = [constrained(model, tok, p, c, prompt.restated_genes)[0] for p, c in zip(test, free)]
    s = score(cons, [p.answer_text for p in test], n_boot=0)
    assert s["format_ratio"] == 1.0 and s["uniqueness"] == 1.0
    for p, c in zip(test, cons):
        assert sorted(split_labels(extract_answer(c))) == sorted(p.candidates)
    # with the scaffold: no free text needed; the think part restates each cell's genes and
    # names the assigned type, the same labels as the answer
    for p in test:
        c, scores = constrained(model, tok, p, "", restated_genes=3)
        labels = split_labels(extract_answer(c))
        assert sorted(labels) == sorted(p.candidates) and scores.shape == (p.n, p.n)
        assert c.startswith("<think>" + think_lines(p, 3, labels) + "</think>")


@pytest.fixture(scope="module")
def scaffold_model(world):
    """The tiny model folder marked as trained on scaffold traces restating 6 genes."""
    return as_scaffold_model(world["folder"], world["root"] / "model-scaffold", genes_per_cell=10, restated_genes=6)


def test_scaffold_rollouts_are_valid_and_only_the_types_are_the_policys(world, scaffold_model):
    model, tok, prompt = load_model(scaffold_model)
    puzzles = [prompt.apply(p) for p in world["splits"]["train"][:6]]
    rollout = scaffold_rollout(tok, puzzles, 6, seed=1)

    class Trainer:  # what rollout_func reads from TRL's trainer
        pass

    Trainer.model = model
    out = rollout([p.messages() for p in puzzles for _ in range(2)], Trainer)
    assert len(out["completion_ids"]) == 12
    for i, (ids, mask) in enumerate(zip(out["completion_ids"], out["env_mask"])):
        p = puzzles[i // 2]
        text = tok.decode(ids, skip_special_tokens=True)
        labels = split_labels(extract_answer(text))
        assert sorted(labels) == sorted(p.candidates)  # always a valid permutation
        assert text.startswith("<think>" + think_lines(p, 6, labels) + "</think>")
        assert len(mask) == len(ids) and len(out["logprobs"][i]) == len(ids)
        # the policy's tokens are exactly the sampled types, in cell order
        assert [t for t, m in zip(ids, mask) if m] == [t for c in labels for t in tok(c, add_special_tokens=False)["input_ids"]]
        assert out["prompt_ids"][i] == tok(prompt_text(tok, p), add_special_tokens=False)["input_ids"]


def test_batched_scaffold_rollouts_match_one_by_one(world, scaffold_model):
    """Rollouts of many puzzles in one batch (slot i of all puzzles per forward pass) write the
    same tokens, mask and log-likelihoods as one puzzle at a time when sampling is greedy."""
    model, tok, prompt = load_model(scaffold_model)
    train = world["splits"]["train"]
    puzzles = [prompt.apply(p) for p in train[:: max(1, len(train) // 12)][:12]]
    assert len({p.n for p in puzzles}) > 1  # rows of different lengths share the batch
    rng = np.random.default_rng(0)
    batched = sample_batch(model, tok, puzzles, 6, 1e-9, rng)
    for p, (ids, mask, lps) in zip(puzzles, batched):
        one = sample_completion(model, tok, p, 6, 1e-9, rng)
        assert ids == one[0] and mask == one[1]
        np.testing.assert_allclose(lps, one[2], atol=1e-4)


@pytest.mark.parametrize("joined", [False, True], ids=["one-token-candidates", "multi-token-candidates"])
def test_slot_scores_equal_a_plain_forward_pass(world, joined):
    import torch

    from cellpuzzles.inference.decode import slot_scores
    from cellpuzzles.task.puzzle import ANSWER_SEP

    model, tok, prompt = load_model(world["folder"])
    p = prompt.apply(world["splits"]["test"][0])
    prefix = prompt_text(tok, p) + "<think>" + cell_line(0, p.genes[0], 6)
    cands = [f"{c}{ANSWER_SEP}{p.candidates[0]}" for c in p.candidates] if joined else p.candidates
    got = slot_scores(model, tok, prefix, cands)
    n = len(tok(prefix, add_special_tokens=False)["input_ids"])
    for c, g in zip(cands, got):
        ids = tok(prefix + c, add_special_tokens=False)["input_ids"]
        assert len(ids) - n == (3 if joined else 1)
        with torch.no_grad():
            logp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        want = sum(logp[i - 1, ids[i]].item() for i in range(n, len(ids)))
        assert abs(want - g) < 1e-4


def test_batched_scaffold_decoding_gives_the_same_answers(world, scaffold_model):
    from cellpuzzles.inference.decode import constrained_many
    from cellpuzzles.inference.scaffold_batch import batchable, constrained_batch

    model, tok, prompt = load_model(scaffold_model)
    test = [prompt.apply(p) for p in world["splits"]["test"][:12]]
    assert len({p.n for p in test}) > 1  # rows finish at different slots
    one = [constrained(model, tok, p, "", 6) for p in test]
    batch = constrained_batch(model, tok, test, 6)
    for (c1, s1), (c2, s2) in zip(one, batch):
        assert c1 == c2
        assert np.allclose(s1, s2, atol=1e-4)
    assert constrained_many(model, tok, test, [""] * len(test), 6, batch_size=5) == [c for c, _ in one]
    assert batchable(tok, test)
    odd = SimpleNamespace(candidates=[test[0].candidates[0] + " subtype"])  # two tokens: not batchable
    assert not batchable(tok, [test[0], odd])

"""PPO through TRL's experimental PPOTrainer with the rule reward (CPU, tiny model)."""

from __future__ import annotations

import json
import random
import shutil

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl.experimental.ppo")

from transformers import GenerationConfig  # noqa: E402

from cellpuzzles.core.errors import CellPuzzlesError  # noqa: E402
from cellpuzzles.task.puzzle import extract_answer, format_completion, make_puzzle, split_labels  # noqa: E402
from cellpuzzles.task.reward import batch_reward  # noqa: E402
from cellpuzzles.distill.teachers.markers import MarkersTeacher  # noqa: E402
from cellpuzzles.train.callbacks import MetricsLogger  # noqa: E402
from cellpuzzles.inference.folder import PromptOptions, load_model
from cellpuzzles.train.tiny import TinyConfig, build_tiny
from cellpuzzles.train.ppo import RuleRewardModel, prompt_ids, train_ppo  # noqa: E402
from cellpuzzles.train.rl_common import RLOptions  # noqa: E402
from cellpuzzles.train.scaffold_rollout import ScaffoldGenerate  # noqa: E402

MARKERS = {"B cell": ["CD79A", "MS4A1"], "T cell": ["CD3E", "IL7R"], "NK cell": ["NKG7", "GNLY"],
           "monocyte": ["LYZ", "CD14"]}


def _puzzles(k: int = 8):
    rng = random.Random(0)
    out = []
    for j in range(k):
        types = rng.sample(sorted(MARKERS), 3)
        out.append(make_puzzle([MARKERS[t] + [f"G{j}"] for t in types], types, "Free text context.", donor_id="d",
                               cell_ids=[f"c{j}_{i}" for i in range(3)]))
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A hidden-32 model gains nothing from intra-op threads, and on a 2-core box shared with
    another busy process two threads spin against each other (a 32x32 matmul: 8 ms instead of
    7 us), which made this module take 60 s instead of 15."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    ps = _puzzles()
    train, val = ps[:6], ps[6:]
    teacher = MarkersTeacher(train)
    traces = [teacher.trace(p) for p in ps]
    folder = build_tiny(ps, traces, tmp_path_factory.mktemp("ppo") / "tiny",
                        TinyConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
                        PromptOptions())
    return train, val, folder


def _query_responses(tok, prompts: list[list[int]], responses: list[list[int]]):
    """What PPOTrainer hands get_reward: left-padded queries, then right-padded responses."""
    pad = tok.pad_token_id
    q = max(map(len, prompts))
    r = max(map(len, responses))
    rows = [[pad] * (q - len(p)) + p + x + [pad] * (r - len(x)) for p, x in zip(prompts, responses)]
    return torch.tensor(rows), q


def test_adapter_reward_is_batch_reward_through_trl_get_reward(tiny):
    from trl.experimental.utils import get_reward

    train, _, folder = tiny
    _, tok, prompt = load_model(folder)
    rm = RuleRewardModel.from_puzzles(tok, train, prompt)
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = tok.eos_token_id
    right = format_completion("", train[0].answer)
    swapped = format_completion("", [train[1].answer[1], train[1].answer[0], train[1].answer[2]])
    garbage = "<answer>T cell, B cell"
    ok3 = format_completion("", train[3].answer)
    assert tok.decode(enc(right)) == right and tok.decode(enc(swapped)) == swapped
    cases = [  # (prompt puzzle, response ids, text the reward must see)
        (train[0], enc(right) + [eos], right),
        (train[1], enc(swapped) + [eos], swapped),
        (train[2], enc(garbage) + [eos], garbage),
        (train[3], enc(ok3) + [eos] + enc(garbage), ok3),  # what follows the EOS is not the completion
        (train[4], enc(format_completion("", train[4].answer)), format_completion("", train[4].answer)),  # no EOS
        (train[5], [], ""),  # empty response
    ]
    prompts = [prompt_ids(tok, p) for p, _, _ in cases]
    qr, context_length = _query_responses(tok, prompts, [c[1] for c in cases])
    _, scores, _ = get_reward(rm, qr, tok.pad_token_id, context_length)
    expected = [batch_reward(text, p.answer_text) for p, _, text in cases]
    assert scores.dtype == torch.float32 and scores.shape == (len(cases),)
    assert scores.tolist() == pytest.approx(expected)
    assert expected[0] == 1.0 and expected[2] == -1.0 and expected[3] == 1.0 and expected[5] == -1.0
    assert -1.0 < expected[1] < 1.0  # two of three cells right: (2/3 + 0) / 2
    stats = rm.drain()
    assert stats["format_ratio"] == pytest.approx(4 / 6)
    assert stats["reward_mean"] == pytest.approx(sum(expected) / len(expected))
    assert rm.drain() == {}
    # a prompt that is not a training prompt is an error, not a silent -1
    with pytest.raises(CellPuzzlesError, match="not one of the training prompts"):
        rm.rewards(torch.tensor([enc("Cell 1: CD3E") + [eos]]), torch.ones(1, 3, dtype=torch.bool))


def test_train_ppo_two_steps(tiny, tmp_path):
    train, val, folder = tiny
    logger = MetricsLogger("rl")
    opt = RLOptions(algo="ppo", max_steps=2, prompts_per_step=2, max_completion_length=16, eval_steps=1,
                    save_steps=2, val_size=2, seed=0)
    out = train_ppo(train, val, folder, tmp_path / "ppo", opt, logger)
    model, tok, _ = load_model(out)
    assert model.config.model_type == "qwen2"
    steps = {}
    for h in logger.history:
        steps.setdefault(h["step"], {}).update(h)
    assert sorted(steps) == [1, 2]
    for s in steps.values():
        for k in ("objective/kl", "objective/scores", "loss/value_avg", "reward_mean", "reward_std",
                  "format_ratio", "completion_length", "val_batch_accuracy", "val_reward"):
            assert k in s, k
        # no missing-EOS penalty: TRL's score is exactly the rule reward
        assert s["objective/scores"] == pytest.approx(s["reward_mean"], abs=1e-6)
        assert 0.0 <= s["format_ratio"] <= 1.0 and 0 < s["completion_length"] <= 16
    assert (tmp_path / "ppo.ckpt" / "checkpoint-2").is_dir()


def test_train_ppo_needs_a_full_batch(tiny, tmp_path):
    train, val, folder = tiny
    with pytest.raises(CellPuzzlesError, match="prompts_per_step"):
        train_ppo(train[:1], val, folder, tmp_path / "x", RLOptions(algo="ppo", prompts_per_step=2))


def test_train_ppo_resumes_after_a_crash(tiny, tmp_path, monkeypatch):
    """A PPO run that dies after its step-2 checkpoint resumes there: checkpoints hold the
    value model too, the resumed run logs steps 3-4 only, at the learning rates an unbroken
    run would use, and the final model is written. A checkpoint without its value model is
    not taken for a complete one."""
    train, val, folder = tiny
    opt = RLOptions(algo="ppo", max_steps=4, prompts_per_step=2, max_completion_length=8, eval_steps=10,
                    save_steps=2, val_size=1, learning_rate=1e-3, resume=True, seed=0)
    real = RuleRewardModel.rewards
    calls = {"n": 0}

    def dies_in_step_3(self, input_ids, attention_mask):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("node lost")
        return real(self, input_ids, attention_mask)

    monkeypatch.setattr(RuleRewardModel, "rewards", dies_in_step_3)
    with pytest.raises(RuntimeError, match="node lost"):
        train_ppo(train, val, folder, tmp_path / "ppo", opt, MetricsLogger("rl"))
    ckpt = tmp_path / "ppo.ckpt" / "checkpoint-2"
    assert (ckpt / "value" / "config.json").is_file() and (ckpt / "optimizer.pt").is_file()
    assert not (tmp_path / "ppo").exists()

    monkeypatch.setattr(RuleRewardModel, "rewards", real)
    logger = MetricsLogger("rl")
    with pytest.warns(UserWarning, match="resumes from .*checkpoint-2"):
        out = train_ppo(train, val, folder, tmp_path / "ppo", opt, logger)
    assert (out / "config.json").is_file()
    lr = {h["step"]: h["lr"] for h in logger.history if "lr" in h}
    assert sorted(lr) == [3, 4]
    assert lr[3] == pytest.approx(1e-3 * 2 / 4) and lr[4] == pytest.approx(1e-3 * 1 / 4)
    assert (tmp_path / "ppo.ckpt" / "checkpoint-4" / "value" / "config.json").is_file()
    # a finished run resumed again returns its last checkpoint's policy as it is
    shutil.copytree(tmp_path / "ppo.ckpt", tmp_path / "again.ckpt")
    with pytest.warns(UserWarning, match="step 4 of 4"):
        again = train_ppo(train, val, folder, tmp_path / "again", opt)
    from safetensors.torch import load_file

    saved, last = load_file(again / "model.safetensors"), load_file(tmp_path / "ppo.ckpt" / "checkpoint-4" / "model.safetensors")
    assert saved.keys() == last.keys() and all(torch.equal(saved[k], last[k]) for k in saved)
    assert any(not torch.equal(saved[k], v) for k, v in load_file(folder / "model.safetensors").items())

    (tmp_path / "again.ckpt" / "checkpoint-2" / "optimizer.pt").write_bytes(b"truncated")
    shutil.rmtree(tmp_path / "again.ckpt" / "checkpoint-4")
    shutil.rmtree(tmp_path / "again")
    with pytest.raises(CellPuzzlesError, match="optimizer.pt is corrupt"):
        train_ppo(train, val, folder, tmp_path / "again", opt)
    shutil.rmtree(tmp_path / "ppo.ckpt" / "checkpoint-4" / "value")
    shutil.rmtree(tmp_path / "ppo.ckpt" / "checkpoint-2")
    with pytest.raises(CellPuzzlesError, match="no complete PPO checkpoint"):
        train_ppo(train, val, folder, tmp_path / "ppo", opt)


def test_train_ppo_with_scaffold_rollouts_always_scores_and_learns(tiny, tmp_path):
    """A model trained on scaffold traces rolls out through the scaffold (``--rollout auto``):
    every completion is a valid permutation, so PPO's score is the informative part of the
    rule reward (0..1, never the -1 of a malformed answer) and the policy changes."""
    train, val, folder = tiny
    marked = tmp_path / "scaffold-model"
    shutil.copytree(folder, marked)
    (marked / "cellpuzzles.json").write_text(json.dumps({"genes_per_cell": None, "restated_genes": 3}))
    logger = MetricsLogger("rl")
    opt = RLOptions(algo="ppo", max_steps=3, prompts_per_step=2, eval_steps=3, save_steps=10, val_size=2,
                    learning_rate=1e-2, seed=0)
    out = train_ppo(train, val, marked, tmp_path / "ppo", opt, logger)
    steps = [h for h in logger.history if "reward_mean" in h]
    assert len(steps) == 3
    assert all(s["format_ratio"] == 1.0 and s["reward_mean"] >= 0.0 for s in steps)
    assert any(s["reward_std"] > 0 for s in steps) or len({s["reward_mean"] for s in steps}) > 1
    # the scaffold writes three cell lines and the answer: far longer than a bare answer
    assert all(s["completion_length"] > 20 for s in steps)
    before, tok, _ = load_model(marked)
    after, _, prompt = load_model(out)
    assert prompt.restated_genes == 3
    assert any((a - b).abs().max() > 0 for a, b in zip(after.parameters(), before.parameters()))
    # the saved policy generates with its own class's generate again, not the rollout stand-in
    assert "generate" not in after.__dict__
    # called as PPOTrainer calls generate: left-padded queries (pad ids zeroed) and a mask
    gen = ScaffoldGenerate(after, tok, {tuple(prompt_ids(tok, p)): p for p in train}, 3, seed=1)
    q = [prompt_ids(tok, p) for p in train[:2]]
    width = max(map(len, q))
    ids = torch.tensor([[0] * (width - len(x)) + x for x in q])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in q])
    res = gen(input_ids=ids, attention_mask=mask, generation_config=GenerationConfig(max_new_tokens=200, temperature=1.0))
    for row, p in zip(res.sequences[:, width:].tolist(), train[:2]):
        text = tok.decode(row, skip_special_tokens=True)
        assert sorted(split_labels(extract_answer(text))) == sorted(p.candidates)
    # the scores are the policy's own logits over the whole sequence (temperature 1), exactly
    # what PPOTrainer's update recomputes, so the first update's ratio is 1
    from trl.experimental.ppo.ppo_trainer import forward

    with torch.no_grad():
        logits = forward(after, res.sequences, tok.pad_token_id).logits[:, width - 1 : -1]
    torch.testing.assert_close(torch.stack(res.scores, 1), logits.float())


def test_env_tokens_make_the_scaffold_the_environments(tiny, tmp_path):
    """With ``EnvTokens`` attached, PPO's forward pass gives every forced scaffold token
    log-probability 0 (ratio 1, KL 0, no gradient) and leaves the sampled types' logits as
    they were; after ``detach`` the model's forward is its own again."""
    from trl.experimental.ppo.ppo_trainer import forward

    from cellpuzzles.train.ppo_env_tokens import EnvTokens

    train, _, folder = tiny
    marked = tmp_path / "scaffold-model"
    shutil.copytree(folder, marked)
    (marked / "cellpuzzles.json").write_text(json.dumps({"genes_per_cell": None, "restated_genes": 3}))
    model, tok, _ = load_model(marked)
    pad = tok.pad_token_id
    env = EnvTokens(pad).attach(model)
    gen = ScaffoldGenerate(model, tok, {tuple(prompt_ids(tok, p)): p for p in train}, 3, seed=1, env=env)
    q = [prompt_ids(tok, p) for p in train[:2]]
    width = max(map(len, q))
    ids = torch.tensor([[pad] * (width - len(x)) + x for x in q])
    mask = (ids != pad).long()
    res = gen(input_ids=ids, attention_mask=mask, generation_config=GenerationConfig(max_new_tokens=200, temperature=1.0))
    seq, resp = res.sequences, res.sequences[:, width:]
    assert len(env.rows) == 2
    model.zero_grad()
    out = forward(model, seq, pad).logits[:, width - 1 : -1]
    lp = torch.log_softmax(out.float(), -1).gather(-1, resp[..., None])[..., 0]
    env.detach()
    with torch.no_grad():
        plain = forward(model, seq, pad).logits[:, width - 1 : -1]
    plain_lp = torch.log_softmax(plain.float(), -1).gather(-1, resp[..., None])[..., 0]
    decided = torch.zeros_like(resp, dtype=torch.bool)  # where the policy sampled a type
    free = torch.zeros(out.shape, dtype=torch.bool)  # the candidates still free there
    for b, p in enumerate(train[:2]):
        row = resp[b].tolist()
        cand = [tok(c, add_special_tokens=False)["input_ids"][0] for c in p.candidates]
        slots = [j for j in range(1, len(row)) if row[j] in cand and tok.decode(row[:j]).endswith("-> ")]
        assert len(slots) == p.n  # one sampled type per cell
        decided[b, slots] = True
        for i, j in enumerate(slots):
            free[b, j, [c for c in cand if c not in row[slots[0]:j]]] = True
    forced = (resp != pad) & ~decided
    assert forced.sum() > 5 * decided.sum()  # the scaffold is most of the completion
    assert torch.all(lp[forced] == 0) and torch.all(plain_lp[forced] < 0)
    # at a decision the policy is a softmax over the free candidates, from the model's own logits
    masked = plain.float().masked_fill(~free, float("-inf"))
    want = torch.log_softmax(masked, -1).gather(-1, resp[..., None])[..., 0]
    torch.testing.assert_close(lp[decided], want[decided])
    assert torch.all(plain_lp[decided] < want[decided] - 1e-4)  # mass on other tokens is gone
    # the scores PPO gets at rollout time are the same logits
    torch.testing.assert_close(torch.stack(res.scores, 1), out.detach().float())
    # no gradient reaches the parameters through a forced token; the decisions' does
    lp[forced].sum().backward(retain_graph=True)
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in model.parameters())
    lp[decided].sum().backward()
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in model.parameters())

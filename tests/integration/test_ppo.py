"""PPO training runs through TRL's experimental PPOTrainer with the rule reward (CPU, tiny
model): two steps, resume after a crash, scaffold rollouts. (The reward adapter and
EnvTokens without training: tests/unit/test_ppo_reward.py.)"""

from __future__ import annotations

import shutil

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl.experimental.ppo")

from transformers import GenerationConfig  # noqa: E402

from cellpuzzles.core.errors import CellPuzzlesError  # noqa: E402
from cellpuzzles.inference.folder import load_model  # noqa: E402
from cellpuzzles.task.puzzle import extract_answer, split_labels  # noqa: E402
from cellpuzzles.train.callbacks import MetricsLogger  # noqa: E402
from cellpuzzles.train.ppo import RuleRewardModel, prompt_ids, train_ppo  # noqa: E402
from cellpuzzles.train.rl_common import RLOptions  # noqa: E402
from cellpuzzles.train.scaffold_rollout import ScaffoldGenerate  # noqa: E402

from helpers.models import as_scaffold_model, assert_loads_as_saved, marker_puzzles, tiny_from_puzzles  # noqa: E402

pytestmark = pytest.mark.slow  # every test here is a training run of several seconds


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """6 training and 2 validation marker puzzles, and an untrained tiny model covering them."""
    ps = marker_puzzles()
    train, val = ps[:6], ps[6:]
    return train, val, tiny_from_puzzles(ps, train, tmp_path_factory.mktemp("ppo") / "tiny")


def test_train_ppo_two_steps(tiny, tmp_path):
    train, val, folder = tiny
    logger = MetricsLogger("rl")
    opt = RLOptions(algo="ppo", max_steps=2, prompts_per_step=2, max_completion_length=16, eval_steps=1,
                    save_steps=2, val_size=2, seed=0)
    out = train_ppo(train, val, folder, tmp_path / "ppo", opt, logger)
    model = assert_loads_as_saved(out, folder)
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
    marked = as_scaffold_model(folder, tmp_path / "scaffold-model", genes_per_cell=None, restated_genes=3)
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


def test_ppo_kl_stays_non_negative_with_multi_token_names(tmp_path):
    """The production-shaped model (byte-level BPE: names such as 'NK cell' span several tokens)
    with scaffold rollouts: every token of a sampled name is a decision over the free
    candidates' token trie, under the policy and the reference alike, and the rollout samples
    from that policy, so TRL's k1 estimate of the KL to the reference (objective/kl) stays
    >= 0 in expectation while the policy moves. (Without the restriction it fell to about
    -3 nats by step 3 here: the policy moved mass to tokens it can never emit.)"""
    from cellpuzzles.distill.teachers.markers import MarkersTeacher

    from helpers.production import build_production_model

    ps = marker_puzzles()
    traces = [MarkersTeacher(ps[:6]).trace(p) for p in ps]
    prod = build_production_model(ps, traces, tmp_path / "prod")
    marked = as_scaffold_model(prod, tmp_path / "prod-scaffold", genes_per_cell=None, restated_genes=2)
    _, tok, _ = load_model(marked)
    assert any(len(tok(" " + c, add_special_tokens=False)["input_ids"]) > 1 for c in ps[0].candidates)
    logger = MetricsLogger("rl")
    opt = RLOptions(algo="ppo", max_steps=4, prompts_per_step=3, eval_steps=10, save_steps=10, val_size=2,
                    learning_rate=1e-2, beta=0.01, use_lora=False, seed=0)
    out = train_ppo(ps[:6], ps[6:], marked, tmp_path / "ppo", opt, logger)
    kl = [h["objective/kl"] for h in logger.history if "objective/kl" in h]
    assert len(kl) == 4
    assert sum(kl) / len(kl) >= -0.05, kl
    steps = [h for h in logger.history if "reward_mean" in h]
    assert all(s["format_ratio"] == 1.0 for s in steps)  # every rollout a valid permutation
    before, _, _ = load_model(marked)
    after, _, _ = load_model(out)
    assert any((a - b).abs().max() > 0 for a, b in zip(after.parameters(), before.parameters()))

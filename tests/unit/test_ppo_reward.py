"""The PPO pieces that need no training run (CPU, tiny untrained model): the rule reward as
TRL's get_reward sees it, EnvTokens' log-probabilities and gradients, and the batch check.
(PPO training runs: tests/integration/test_ppo.py.)"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl.experimental.ppo")

from transformers import GenerationConfig  # noqa: E402

from cellpuzzles.core.errors import CellPuzzlesError  # noqa: E402
from cellpuzzles.inference.folder import load_model  # noqa: E402
from cellpuzzles.task.puzzle import format_completion  # noqa: E402
from cellpuzzles.task.reward import batch_reward  # noqa: E402
from cellpuzzles.train.ppo import RuleRewardModel, prompt_ids, train_ppo  # noqa: E402
from cellpuzzles.train.rl_common import RLOptions  # noqa: E402
from cellpuzzles.train.scaffold_rollout import ScaffoldGenerate  # noqa: E402

from helpers.models import as_scaffold_model, marker_puzzles, tiny_from_puzzles  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """6 training and 2 validation marker puzzles, and an untrained tiny model covering them."""
    ps = marker_puzzles()
    train, val = ps[:6], ps[6:]
    return train, val, tiny_from_puzzles(ps, train, tmp_path_factory.mktemp("ppo") / "tiny")


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


def test_train_ppo_needs_a_full_batch(tiny, tmp_path):
    train, val, folder = tiny
    with pytest.raises(CellPuzzlesError, match="prompts_per_step"):
        train_ppo(train[:1], val, folder, tmp_path / "x", RLOptions(algo="ppo", prompts_per_step=2))


def test_env_tokens_make_the_scaffold_the_environments(tiny, tmp_path):
    """With ``EnvTokens`` attached, PPO's forward pass gives every forced scaffold token
    log-probability 0 (ratio 1, KL 0, no gradient) and leaves the sampled types' logits as
    they were; after ``detach`` the model's forward is its own again."""
    from trl.experimental.ppo.ppo_trainer import forward

    from cellpuzzles.train.ppo_env_tokens import EnvTokens

    train, _, folder = tiny
    marked = as_scaffold_model(folder, tmp_path / "scaffold-model", genes_per_cell=None, restated_genes=3)
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
        for j in slots:
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

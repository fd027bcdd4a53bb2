"""Scaffold rollouts (GRPO's rollout_func, PPO's generate) with both models: the tiny word-level
one and the production-shaped one (byte-level BPE, names of several tokens). The ids RL trains
on are exactly the tokenizer's encoding of the rollout's text, token for token; with PPO's
environment hook every token of a sampled name is a decision over the free candidates' token
trie, and the rollout samples from that same policy."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl.experimental.ppo")

from transformers import GenerationConfig  # noqa: E402

from cellpuzzles.inference.folder import load_model  # noqa: E402
from cellpuzzles.inference.prompting import prompt_text  # noqa: E402
from cellpuzzles.task.puzzle import extract_answer, split_labels  # noqa: E402
from cellpuzzles.task.scaffold import think_lines  # noqa: E402
from cellpuzzles.train.ppo import prompt_ids  # noqa: E402
from cellpuzzles.train.ppo_env_tokens import EnvTokens  # noqa: E402
from cellpuzzles.train.scaffold_rollout import ScaffoldGenerate, sample_rows, scaffold_rollout  # noqa: E402

from helpers.models import as_scaffold_model, marker_puzzles, tiny_from_puzzles  # noqa: E402
from helpers.production import build_production_model  # noqa: E402

pytestmark = pytest.mark.slow  # builds two model folders

K = 2


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Marker puzzles (three cells, names such as 'NK cell', 'monocyte') and both models,
    marked as trained on scaffold traces."""
    from cellpuzzles.distill.teachers.markers import MarkersTeacher

    root = tmp_path_factory.mktemp("canon")
    ps = marker_puzzles()
    tiny = tiny_from_puzzles(ps, ps[:6], root / "tiny")
    traces = [MarkersTeacher(ps[:6]).trace(p) for p in ps]
    prod = build_production_model(ps, traces, root / "prod")
    return ps, {"tiny": as_scaffold_model(tiny, root / "tiny-s", None, K),
                "production": as_scaffold_model(prod, root / "prod-s", None, K)}


@pytest.fixture(params=["tiny", "production"])
def loaded(request, folders):
    ps, models = folders
    model, tok, prompt = load_model(models[request.param])
    return request.param, model, tok, [prompt.apply(p) for p in ps]


def test_grpo_rollout_ids_are_the_canonical_tokens_of_its_text(loaded):
    kind, model, tok, puzzles = loaded

    class Trainer:  # what rollout_func reads from TRL's trainer
        pass

    Trainer.model = model
    out = scaffold_rollout(tok, puzzles, K, seed=3)([p.messages() for p in puzzles for _ in range(2)], Trainer)
    multi = False
    for i, (ids, mask, lps) in enumerate(zip(out["completion_ids"], out["env_mask"], out["logprobs"])):
        p = puzzles[i // 2]
        assert ids[-1] == tok.eos_token_id
        text = tok.decode(ids[:-1])
        assert ids[:-1] == tok(text, add_special_tokens=False)["input_ids"]  # token for token
        labels = split_labels(extract_answer(text))
        assert sorted(labels) == sorted(p.candidates)
        assert text.startswith("<think>" + think_lines(p, K, labels) + "</think>")
        assert len(mask) == len(ids) == len(lps)
        # the decisions are the names' tokens, each name's run of 1s covering its text
        runs, cur = [], []
        for t, m in zip(ids, mask):
            if m:
                cur.append(t)
            elif cur:
                runs.append(cur)
                cur = []
        assert len(runs) == p.n
        for run, label in zip(runs, labels):
            assert label in tok.decode(run)
            multi |= len(run) > 1
        assert all(lp < 0 for lp, m in zip(lps, mask) if m) and all(lp == 0 for lp, m in zip(lps, mask) if not m)
        assert out["prompt_ids"][i] == tok(prompt_text(tok, p), add_special_tokens=False)["input_ids"]
    assert multi == (kind == "production")


def test_ppo_decisions_are_the_free_candidates_token_trie(loaded):
    """Through ScaffoldGenerate and EnvTokens: forced tokens get log-probability 0; at every
    token of a sampled name the policy is a softmax over the tokens the free candidates allow
    there (the rollout's own record of them); and the rollout samples from that policy: the
    frequency of each candidate at the first slot matches the product of those probabilities."""
    from trl.experimental.ppo.ppo_trainer import forward

    kind, model, tok, puzzles = loaded
    pad = tok.pad_token_id
    env = EnvTokens(pad).attach(model)
    gen = ScaffoldGenerate(model, tok, {tuple(prompt_ids(tok, p)): p for p in puzzles}, K, seed=1, env=env)
    q = [prompt_ids(tok, p) for p in puzzles[:3]]
    width = max(map(len, q))
    ids = torch.tensor([[pad] * (width - len(x)) + x for x in q])
    res = gen(input_ids=ids, attention_mask=(ids != pad).long(),
              generation_config=GenerationConfig(max_new_tokens=400, temperature=1.0))
    resp = res.sequences[:, width:]
    with torch.no_grad():
        hooked = forward(model, res.sequences, pad).logits[:, width - 1:-1].float().log_softmax(-1)
        env_rows = dict(env.rows)
        env.detach()
        plain = forward(model, res.sequences, pad).logits[:, width - 1:-1].float()
    n_dec = 0
    for b, x in enumerate(q):
        forced, allowed = _registered(env_rows, x, resp[b].tolist(), pad)
        row = resp[b].tolist()
        for j, f in enumerate(forced):
            lp = hooked[b, j, row[j]].item()
            if f:
                assert lp == 0.0
                continue
            opts = allowed[sum(1 for z in forced[:j] if not z)]
            assert row[j] in opts
            want = plain[b, j, opts].log_softmax(-1)[opts.index(row[j])].item()
            assert abs(lp - want) < 1e-4, (kind, j)
            n_dec += 1
    assert n_dec >= 9  # three names per puzzle, three puzzles
    torch.testing.assert_close(torch.stack(res.scores, 1).log_softmax(-1), hooked, atol=1e-4, rtol=1e-4)


def _registered(rows: dict, query: list[int], completion: list[int], pad: int):
    """(forced, allowed) registered for the row whose ids are query + completion."""
    from cellpuzzles.train.ppo_env_tokens import ids_key

    row = np.asarray(query + completion)
    _, forced, allowed = rows[ids_key(row[row != pad])]
    return list(forced), allowed


def test_rollouts_sample_the_policy_ppo_evaluates(loaded):
    """At the first slot, each candidate's frequency over many rollouts is the product, over its
    tokens, of the softmax among the tokens the free candidates allow (the hooked policy)."""
    kind, model, tok, puzzles = loaded
    p = puzzles[0]
    rng = np.random.default_rng(0)
    rows = sample_rows(model, tok, [p] * 300, K, 1.0, rng)
    first = [r.chosen[0] for r in rows]
    row = rows[0]
    want = np.zeros(p.n)
    # the policy's probability of each candidate: walk its tail through the allowed sets, from
    # the per-token log-likelihoods of a rollout that chose it
    for j in range(p.n):
        r = next((r for r in rows if r.chosen[0] == j), None)
        if r is None:
            continue
        dec = [k for k, m in enumerate(r.mask) if m][: _first_len(r)]
        logp = 0.0
        for d, k in enumerate(dec):
            opts = r.allowed[d]
            alts = _alt_logps(model, tok, p, r, k, opts)
            logp += alts[opts.index(r.ids[k])] - np.logaddexp.reduce(alts)
        want[j] = np.exp(logp)
    freq = np.bincount(first, minlength=p.n) / len(first)
    assert abs(want.sum() - 1) < 0.05 or (want == 0).any()
    assert np.abs(freq - want).max() < 0.1, (kind, freq, want)
    assert row.ids == tok(row.text, add_special_tokens=False)["input_ids"]


def _first_len(r) -> int:
    """Number of decision tokens of the first slot's name: the first run of mask 1s."""
    k = r.mask.index(1)
    n = 0
    while k + n < len(r.mask) and r.mask[k + n]:
        n += 1
    return n


def _alt_logps(model, tok, p, r, k: int, opts: list[int]) -> np.ndarray:
    """log p(option | prompt + completion ids before position k), a plain forward pass."""
    ids = prompt_ids(tok, p) + r.ids[:k]
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)
    return np.array([logp[o].item() for o in opts])

"""Rollouts through the per-cell scaffold (``cellpuzzles.task.scaffold``) for models trained on
scaffold traces: GRPO takes them as TRL's ``rollout_func``, PPO through the policy's
``generate`` (``ScaffoldGenerate``).

A rollout is written the way the served (constrained) mode writes an answer: the scaffold
text (``Cell i: <genes> -> ``) is filled in by the environment and the policy samples each
cell's type among the candidates not yet used, from its own likelihood of each candidate at
that slot (temperature applies), token by token through the trie of the free candidates'
tokens, so names of any token length are sampled as the model would write them. The
completion is then the scaffold with the sampled types plus the answer, so it is always a
valid permutation and the batch reward is always informative. Its token ids are exactly the
tokenizer's encoding of its text (every candidate is tokenized in place, with the text around
it: ``inference.slot_tails``), the path SFT trained and inference takes.
For GRPO only the sampled type tokens are the policy's (``env_mask`` 1); the scaffold and
answer tokens are the environment's (0), so the loss, the KL and the length statistics cover
the decisions alone. TRL's PPOTrainer has no such mask; there a forward
hook does the same (``ppo_env_tokens.EnvTokens``, registered by ``ScaffoldGenerate``).

Why: the tiny model's free rollouts almost never end in a valid answer, so every rollout
scores -1, the group advantage (GRPO) and the score signal (PPO) are zero and RL learns
nothing (measured: docs/training.md, docs/results.md).
"""

from __future__ import annotations

import numpy as np

from cellpuzzles.task.puzzle import Puzzle


def sample_rows(model, tok, puzzles: list[Puzzle], k: int, temperature: float, rng) -> list:
    """Scaffold rollouts of many (already shown) puzzles, slot i of all of them and every
    candidate in one forward pass (``inference.slot_batch``); each type is sampled token by
    token through the trie of the still-free candidates (``TrieSampler``). Per puzzle a
    ``slot_batch.Filled``: ``ids`` are exactly the tokenizer's encoding of the completion
    text, ``mask`` is 1 on the sampled types' tokens, ``logps`` their log-likelihoods and
    ``allowed`` the token ids the free candidates allowed at each of them."""
    from cellpuzzles.inference.scaffold_batch import prompt_ids, scaffold_layout
    from cellpuzzles.inference.slot_batch import TrieSampler, fill_slots

    layouts = [scaffold_layout(p, k) for p in puzzles]
    return fill_slots(model, tok, prompt_ids(tok, puzzles), layouts, TrieSampler(temperature, rng))


def sample_batch(model, tok, puzzles: list[Puzzle], k: int, temperature: float, rng) -> list[tuple[list, list, list]]:
    """(completion ids ending in EOS when the tokenizer has one, mask of the sampled type
    tokens, log-likelihood per token) per puzzle, from ``sample_rows``."""
    return [_with_eos(tok, row) for row in sample_rows(model, tok, puzzles, k, temperature, rng)]


def sample_completion(model, tok, p: Puzzle, k: int, temperature: float, rng) -> tuple[list, list, list]:
    """``sample_batch`` of one puzzle."""
    return sample_batch(model, tok, [p], k, temperature, rng)[0]


def _with_eos(tok, row) -> tuple[list, list, list]:
    if tok.eos_token_id is None:
        return list(row.ids), list(row.mask), list(row.logps)
    return row.ids + [tok.eos_token_id], row.mask + [0], row.logps + [0.0]


class _Eval:
    """The model in eval mode for the block, then back to how it was."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc):
        if self.was_training:
            self.model.train()


def scaffold_rollout(tok, puzzles: list[Puzzle], k: int, temperature: float = 1.0, seed: int = 0):
    """A ``rollout_func(prompts, trainer)`` for GRPOTrainer over these (already shown) puzzles."""
    from cellpuzzles.inference.prompting import prompt_text

    by_prompt = {p.user_msg: p for p in puzzles}
    rng = np.random.default_rng(seed)

    def rollout(prompts, trainer) -> dict:
        out = {"prompt_ids": [], "completion_ids": [], "logprobs": [], "env_mask": []}
        shown = [by_prompt[messages[-1]["content"]] for messages in prompts]
        with _Eval(trainer.model):
            rows = sample_batch(trainer.model, tok, shown, k, temperature, rng)
        for p, (ids, mask, lps) in zip(shown, rows):
            out["prompt_ids"].append(tok(prompt_text(tok, p), add_special_tokens=False)["input_ids"])
            out["completion_ids"].append(ids)
            out["env_mask"].append(mask)
            out["logprobs"].append(lps)
        return out

    return rollout


class ScaffoldGenerate:
    """Stands in for the policy's ``generate`` while TRL's PPOTrainer rolls out: same call
    (left-padded ``input_ids`` with pad ids zeroed, ``attention_mask``, ``generation_config``),
    same result (``sequences`` = query + completion right-padded with the pad id, ``scores``
    = one [batch, vocab] tensor per completion position).

    The completions are scaffold rollouts. The scores are the policy's own logits at each
    completion position over the whole sequence, divided by the temperature, computed with
    TRL's PPO forward pass: exactly what PPOTrainer computes for the new log-probabilities
    in its update, so the first update's ratio is 1 as on-policy PPO expects. Each query is
    matched to its puzzle by its token ids (``queries``: ids tuple -> shown puzzle). With
    ``env`` (``ppo_env_tokens.EnvTokens``) the batch's forced tokens are registered first, so
    these scores, like every later PPO forward pass, treat them as the environment's."""

    def __init__(self, model, tok, queries: dict[tuple, Puzzle], k: int, seed: int = 0, env=None):
        self.model, self.tok, self.queries, self.k, self.env = model, tok, queries, k, env
        self.rng = np.random.default_rng(seed)

    def __call__(self, input_ids, attention_mask, generation_config, **kwargs):
        import torch
        from transformers.generation.utils import GenerateDecoderOnlyOutput
        from trl.experimental.ppo.ppo_trainer import forward

        from cellpuzzles.core.errors import CellPuzzlesError

        pad = self.tok.pad_token_id
        temperature = float(generation_config.temperature or 1.0)
        budget = int(generation_config.max_new_tokens)
        shown, unpadded = [], []
        for ids, mask in zip(input_ids.tolist(), attention_mask.bool().tolist()):
            q = [i for i, m in zip(ids, mask) if m]
            p = self.queries.get(tuple(q))
            if p is None:
                raise CellPuzzlesError("PPO scaffold rollout: a query is not one of the training prompts")
            shown.append(p)
            unpadded.append(q)
        with _Eval(self.model):
            filled = sample_rows(self.model, self.tok, shown, self.k, temperature, self.rng)
            sampled = [_with_eos(self.tok, row) for row in filled]
            rows = [r[0][:budget] for r in sampled]
            if self.env is not None:
                self.env.reset()
                for q, row, (ids, mask, _) in zip(unpadded, filled, sampled):
                    # every token of a type is a decision over the free candidates' token trie
                    self.env.register(q, ids[:budget], [m == 0 for m in mask[:budget]], row.allowed)
            width = max(len(r) for r in rows)
            completion = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=input_ids.device)
            queries = torch.masked_fill(input_ids, ~attention_mask.bool(), pad)
            sequences = torch.cat([queries, completion], 1)
            with torch.no_grad():
                logits = forward(self.model, sequences, pad).logits[:, input_ids.shape[1] - 1 : -1]
            logits = logits.float() / temperature
        return GenerateDecoderOnlyOutput(sequences=sequences, scores=tuple(logits.unbind(1)))

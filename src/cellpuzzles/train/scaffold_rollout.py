"""Rollouts through the per-cell scaffold (``cellpuzzles.task.scaffold``) for models trained on
scaffold traces: GRPO takes them as TRL's ``rollout_func``, PPO through the policy's
``generate`` (``ScaffoldGenerate``).

A rollout is written the way the served (constrained) mode writes an answer: the scaffold
text (``Cell i: <genes> -> ``) is filled in by the environment and the policy samples each
cell's type among the candidates not yet used, from its own likelihood of each candidate at
that slot (temperature applies). The completion is then the scaffold with the sampled types
plus the answer, so it is always a valid permutation and the batch reward is always
informative. For GRPO only the sampled type tokens are the policy's (``env_mask`` 1); the
scaffold and answer tokens are the environment's (0), so the loss, the KL and the length
statistics cover the decisions alone. TRL's PPOTrainer has no such mask; there a forward
hook does the same (``ppo_env_tokens.EnvTokens``, registered by ``ScaffoldGenerate``).

Why: the tiny model's free rollouts almost never end in a valid answer, so every rollout
scores -1, the group advantage (GRPO) and the score signal (PPO) are zero and RL learns
nothing (measured: docs/training.md, docs/results.md).
"""

from __future__ import annotations

import numpy as np

from cellpuzzles.task.puzzle import ANSWER_SEP, Puzzle
from cellpuzzles.task.scaffold import cell_line


def sample_completion(model, tok, p: Puzzle, k: int, temperature: float, rng) -> tuple[list, list, list]:
    """One scaffold rollout of puzzle ``p`` (already shown, ``PromptOptions.apply``):
    completion token ids (ending in EOS when the tokenizer has one), a mask (1 on the sampled
    type tokens) and a log-likelihood per token (the sampled candidate's, spread over its tokens)."""
    from cellpuzzles.inference.decode import PrefixCache, slot_scores
    from cellpuzzles.inference.prompting import prompt_text

    head = prompt_text(tok, p)
    ids, mask, lps = [], [], []
    text = ""  # the completion so far, as text
    chosen: list[str] = []
    state = PrefixCache(model)
    for i in range(p.n):
        piece = ("<think>" if i == 0 else "\n") + cell_line(i, p.genes[i], k)
        _extend(tok, ids, mask, lps, piece)
        text += piece
        scores = slot_scores(model, tok, head + text, p.candidates, state)
        j = _sample(scores, {p.candidates.index(c) for c in chosen}, temperature, rng)
        state.commit(j)
        chosen.append(p.candidates[j])
        text += p.candidates[j]
        own = tok(p.candidates[j], add_special_tokens=False)["input_ids"]
        ids += own
        mask += [1] * len(own)
        lps += [float(scores[j]) / len(own)] * len(own)
    return _finish(tok, ids, mask, lps, chosen)


def sample_batch(model, tok, puzzles: list[Puzzle], k: int, temperature: float, rng) -> list[tuple[list, list, list]]:
    """``sample_completion`` for many puzzles: slot i of all of them in one forward pass
    (``scaffold_batch.fill_slots``) when every candidate is one token, else one by one."""
    from cellpuzzles.inference.scaffold_batch import batchable, fill_slots

    if not batchable(tok, puzzles):
        return [sample_completion(model, tok, p, k, temperature, rng) for p in puzzles]

    def pick(scores, used):
        return _sample(scores, used, temperature, rng)

    out = []
    for p, row in zip(puzzles, fill_slots(model, tok, puzzles, k, pick)):
        own = iter(row["scores"][i, j] for i, j in enumerate(row["chosen"]))  # one token per type
        lps = [float(next(own)) if m else 0.0 for m in row["mask"]]
        out.append(_finish(tok, row["ids"], row["mask"], lps, [p.candidates[j] for j in row["chosen"]]))
    return out


def _sample(scores: np.ndarray, used: set, temperature: float, rng) -> int:
    """A candidate index not in ``used``, drawn with probability ~ exp(score / temperature)."""
    free = [j for j in range(len(scores)) if j not in used]
    z = scores[free] / max(temperature, 1e-6)
    prob = np.exp(z - z.max())
    return free[int(rng.choice(len(free), p=prob / prob.sum()))]


def _finish(tok, ids: list, mask: list, lps: list, chosen: list[str]) -> tuple[list, list, list]:
    """Close the think part, write the answer (the environment's tokens) and EOS."""
    _extend(tok, ids, mask, lps, f"</think>\n<answer>{ANSWER_SEP.join(chosen)}</answer>")
    if tok.eos_token_id is not None:
        ids, mask, lps = ids + [tok.eos_token_id], mask + [0], lps + [0.0]
    return ids, mask, lps


def _extend(tok, ids: list, mask: list, lps: list, text: str) -> None:
    new = tok(text, add_special_tokens=False)["input_ids"]
    ids += new
    mask += [0] * len(new)
    lps += [0.0] * len(new)


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

    def _free(self, p: Puzzle, ids: list, mask: list) -> list[list[int]] | None:
        """The candidates' token ids still free at each decision (one token per type), or
        None when a candidate spans several tokens."""
        cand = [self.tok(c, add_special_tokens=False)["input_ids"] for c in p.candidates]
        if any(len(c) != 1 for c in cand):
            return None
        free, out = [c[0] for c in cand], []
        for t, m in zip(ids, mask):
            if m:
                out.append(list(free))
                free.remove(t)
        return out

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
            sampled = sample_batch(self.model, self.tok, shown, self.k, temperature, self.rng)
            rows = [r[0][:budget] for r in sampled]
            if self.env is not None:
                self.env.reset()
                for q, p, (ids, mask, _) in zip(unpadded, shown, sampled):
                    self.env.register(q, ids[:budget], [m == 0 for m in mask[:budget]], self._free(p, ids, mask))
            width = max(len(r) for r in rows)
            completion = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=input_ids.device)
            queries = torch.masked_fill(input_ids, ~attention_mask.bool(), pad)
            sequences = torch.cat([queries, completion], 1)
            with torch.no_grad():
                logits = forward(self.model, sequences, pad).logits[:, input_ids.shape[1] - 1 : -1]
            logits = logits.float() / temperature
        return GenerateDecoderOnlyOutput(sequences=sequences, scores=tuple(logits.unbind(1)))

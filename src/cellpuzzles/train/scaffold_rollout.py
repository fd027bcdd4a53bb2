"""GRPO rollouts through the per-cell scaffold (``cellpuzzles.scaffold``), as TRL's
``rollout_func``.

For a model trained on scaffold traces, a rollout is written the way the served
(constrained) mode writes an answer: the scaffold text (``Cell i: <genes> -> ``) is
filled in by the environment and the policy samples each cell's type among the candidates
not yet used, from its own likelihood of each candidate at that slot (temperature
applies). The completion is then the scaffold with the sampled types plus the answer, so
it is always a valid permutation and the batch reward is always informative. Only the
sampled type tokens are the policy's (``env_mask`` 1); the scaffold and answer tokens are
the environment's (0), so the loss, the KL and the length statistics cover the decisions
alone.

Why: the tiny model's free rollouts almost never end in a valid answer, so every rollout
of a group scores -1, the group advantage is zero and GRPO learns nothing (measured:
reward -1.0 on every rollout of the default run).
"""

from __future__ import annotations

import numpy as np

from ..puzzle import ANSWER_SEP, Puzzle
from ..scaffold import cell_line


def scaffold_rollout(tok, puzzles: list[Puzzle], k: int, temperature: float = 1.0, seed: int = 0):
    """A ``rollout_func(prompts, trainer)`` for GRPOTrainer over these (already shown) puzzles."""
    by_prompt = {p.user_msg: p for p in puzzles}
    rng = np.random.default_rng(seed)

    def rollout(prompts, trainer) -> dict:
        from ..decode import PrefixCache, prompt_text, slot_scores

        model = trainer.model
        was_training = model.training
        model.eval()
        prompt_ids, completion_ids, logprobs, env_mask = [], [], [], []
        try:
            for messages in prompts:
                p = by_prompt[messages[-1]["content"]]
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
                    free = [j for j, c in enumerate(p.candidates) if c not in chosen]
                    z = scores[free] / max(temperature, 1e-6)
                    prob = np.exp(z - z.max())
                    j = free[int(rng.choice(len(free), p=prob / prob.sum()))]
                    state.commit(j)
                    chosen.append(p.candidates[j])
                    text += p.candidates[j]
                    own = tok(p.candidates[j], add_special_tokens=False)["input_ids"]
                    ids += own
                    mask += [1] * len(own)
                    lps += [float(scores[j]) / len(own)] * len(own)  # the candidate's log-likelihood, spread
                _extend(tok, ids, mask, lps, f"</think>\n<answer>{ANSWER_SEP.join(chosen)}</answer>")
                if tok.eos_token_id is not None:
                    ids, mask, lps = ids + [tok.eos_token_id], mask + [0], lps + [0.0]
                prompt_ids.append(tok(head, add_special_tokens=False)["input_ids"])
                completion_ids.append(ids)
                env_mask.append(mask)
                logprobs.append(lps)
        finally:
            if was_training:
                model.train()
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": logprobs, "env_mask": env_mask}

    return rollout


def _extend(tok, ids: list, mask: list, lps: list, text: str) -> None:
    new = tok(text, add_special_tokens=False)["input_ids"]
    ids += new
    mask += [0] * len(new)
    lps += [0.0] * len(new)

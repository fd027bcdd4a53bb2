"""The scaffold's tokens as the environment's, for TRL's PPOTrainer (which has no env mask).

A scaffold rollout (``scaffold_rollout.ScaffoldGenerate``) is mostly text the environment
writes: ``Cell i: <genes> -> `` before each choice, and the answer after. Only the sampled
type tokens are the policy's decisions. GRPO gets that as ``env_mask``; TRL 1.12's
PPOTrainer counts every completion token as an action, in the ratio, the policy gradient,
the per-token KL and the entropy. The forced tokens, many per decision, then dominate the
update (their gradient noise fills the clipped gradient norm, and their summed KL swamps the
batch reward in the return), and the training reward fell while PPO trained (measured:
docs/training.md, docs/results.md).

``EnvTokens`` is a forward hook on the policy and the reference model. For the rows of the
current rollout batch (registered by ``ScaffoldGenerate``, matched by their token ids) it
replaces the logits that predict a forced token with a constant that gives that token
probability 1: its log-probability is 0 under the policy and the reference alike, so its
ratio is 1, its KL and entropy 0, and it carries no gradient. At each decision token it keeps
only the logits of the tokens the candidates still free allow there (when they are given): a
name of several tokens is a path through the trie of the free candidates' tokens, every token
of it a decision. So the policy PPO optimises is the one the rollout sampled from
(``slot_batch.TrieSampler``): a softmax over the allowed tokens at each step of the path. Without that, the
k1 KL estimate on the sampled types went negative as the policy moved mass to tokens it can
never emit (measured: docs/results.md). The hidden states of every position (which the
decisions attend to) are untouched. Any other forward (sampling, validation, evaluation)
matches no registered row and passes through.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

# a logit far below any real one: exp(FLOOR) underflows to 0 in bf16, fp16 and fp32
FLOOR = -1e4


def ids_key(ids) -> bytes:
    """A short digest of a token id sequence (dictionary key for rows matched by their ids)."""
    return hashlib.blake2b(np.asarray(ids, dtype=np.int64).tobytes(), digest_size=16).digest()


class EnvTokens:
    """Registry of the current rollout batch and the forward hook that uses it."""

    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id
        self.rows: dict[bytes, tuple[int, np.ndarray, list | None]] = {}
        self._handles = []

    def reset(self) -> None:
        self.rows.clear()

    def register(self, query: list[int], completion: list[int], forced: list[bool],
                 allowed: list[list[int]] | None = None) -> None:
        """One rollout: the unpadded query ids, the completion ids, which completion tokens
        the environment wrote, and (optional) the token ids the policy could choose from at
        each of its decision tokens, in order (every token of a sampled name). Keyed by the
        non-pad ids, as PPO's forward sees the row."""
        row = np.asarray(query + completion, dtype=np.int64)
        self.rows[ids_key(row[row != self.pad])] = (len(query), np.asarray(forced, dtype=bool), allowed)

    def attach(self, *models) -> EnvTokens:
        for m in models:
            if m is not None:
                self._handles.append(m.register_forward_hook(self._hook, with_kwargs=True))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.reset()

    def positions(self, input_ids: torch.Tensor) -> tuple[list, list]:
        """Logit positions that predict a forced token, as (rows, positions, forced token ids)
        arrays, and those that make a decision with its choices given, as (row, position,
        allowed ids) tuples."""
        rows, pos, tgt, decided_at = [], [], [], []
        ids = input_ids.detach().cpu().numpy()
        for b, row in enumerate(ids):
            keep = row != self.pad
            hit = self.rows.get(ids_key(row[keep]))
            if hit is None:
                continue
            qlen, forced, allowed = hit
            at = int(np.argmax(keep)) + qlen  # the completion's first position in the padded row
            t = at + np.flatnonzero(forced)
            t = t[(t > 0) & (t < len(row))]
            rows.append(np.full(len(t), b))
            pos.append(t - 1)
            tgt.append(row[t])
            if allowed is not None:
                for d, j in enumerate(np.flatnonzero(~forced)):
                    if 0 < at + j < len(row):
                        decided_at.append((b, at + int(j) - 1, allowed[d]))
        if not rows:
            return (np.zeros(0, int),) * 3, decided_at
        return (np.concatenate(rows), np.concatenate(pos), np.concatenate(tgt)), decided_at

    def _hook(self, module, args, kwargs, output):
        if not self.rows:
            return output
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        logits = getattr(output, "logits", None)
        if input_ids is None or logits is None or logits.shape[1] != input_ids.shape[1]:
            return output
        (fr, fp, ft), decided_at = self.positions(input_ids)
        if not len(fr) and not decided_at:
            return output
        dev, vocab = logits.device, logits.shape[-1]
        logits = logits.clone()
        if decided_at:
            r = torch.tensor([x[0] for x in decided_at], device=dev)
            p = torch.tensor([x[1] for x in decided_at], device=dev)
            free = torch.zeros(len(decided_at), vocab, dtype=torch.bool, device=dev)
            for i, (_, _, allowed) in enumerate(decided_at):
                free[i, allowed] = True
            logits[r, p] = torch.where(free, logits[r, p], torch.full_like(logits[r, p], FLOOR))
        if len(fr):
            fill = torch.full((len(fr), vocab), FLOOR, dtype=logits.dtype, device=dev)
            fill[torch.arange(len(fr), device=dev), torch.as_tensor(ft, device=dev)] = 0
            logits[torch.as_tensor(fr, device=dev), torch.as_tensor(fp, device=dev)] = fill
        output.logits = logits
        return output

"""Constrained scaffold decoding of many puzzles in one batch (``cellpuzzles.task.scaffold``).

The same answers as ``decode.constrained(..., restated_genes=k)`` puzzle by puzzle, but
slot i of every puzzle runs in one forward pass: each row's new tokens (the previous
slot's chosen type, the newline and the next cell's scaffold line) are appended to a
shared KV cache, left-padded within the step and masked, with explicit positions, so
every row sees exactly its own sequence. Needs one-token candidates (the tiny model's
types are); ``batchable`` says whether a batch qualifies. ``fill_slots`` is the shared
loop: greedy here, sampled for RL rollouts (``train/scaffold_rollout.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cellpuzzles.task.assign import assign_labels
from cellpuzzles.task.puzzle import Puzzle, format_completion
from cellpuzzles.task.scaffold import cell_line, think_lines


def batchable(tok, puzzles: Sequence[Puzzle]) -> bool:
    cands = {c for p in puzzles for c in p.candidates}
    return all(len(tok(c, add_special_tokens=False)["input_ids"]) == 1 for c in cands)


def fill_slots(model, tok, puzzles: Sequence[Puzzle], k: int, pick=None) -> list[dict]:
    """Write every puzzle's scaffold, slot i of all puzzles in one forward pass. At each slot
    ``pick(scores, used)`` returns the index of the candidate written there (default:
    the best one not used yet). Per puzzle: ``scores`` (cells x candidates log-likelihoods),
    ``chosen`` (candidate index per cell), ``ids`` (the completion's token ids so far: the
    think part without its closing tag) and ``mask`` (1 on the chosen type tokens)."""
    import torch

    from cellpuzzles.inference.prompting import prompt_text

    pick = pick or _best_unused
    model.eval()
    B = len(puzzles)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    cand_ids = [[tok(c, add_special_tokens=False)["input_ids"][0] for c in p.candidates] for p in puzzles]
    out_rows = [{"scores": np.zeros((p.n, p.n)), "chosen": [], "ids": [], "mask": []} for p in puzzles]
    pending = [tok(prompt_text(tok, p), add_special_tokens=False)["input_ids"] for p in puzzles]
    lengths = [0] * B  # real tokens each row has in the cache
    mask = torch.zeros((B, 0), dtype=torch.long)
    cache = None
    for i in range(max(p.n for p in puzzles)):
        for r, p in enumerate(puzzles):
            if i < p.n:
                text = ("<think>" if i == 0 else "\n") + cell_line(i, p.genes[i], k)
                line = tok(text, add_special_tokens=False)["input_ids"]
                pending[r] = pending[r] + line
                out_rows[r]["ids"] += line
                out_rows[r]["mask"] += [0] * len(line)
        width = max(len(x) for x in pending)
        ids = torch.full((B, width), pad, dtype=torch.long)
        step_mask = torch.zeros((B, width), dtype=torch.long)
        pos = torch.zeros((B, width), dtype=torch.long)
        for r, x in enumerate(pending):
            if x:
                ids[r, width - len(x):] = torch.tensor(x)
                step_mask[r, width - len(x):] = 1
                pos[r, width - len(x):] = torch.arange(lengths[r], lengths[r] + len(x))
                lengths[r] += len(x)
        mask = torch.cat([mask, step_mask], dim=1)
        with torch.no_grad():
            out = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                        position_ids=pos.to(model.device), past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logp = torch.log_softmax(out.logits[:, -1].float(), -1).cpu().numpy()
        for r, p in enumerate(puzzles):
            pending[r] = []
            if i >= p.n:
                continue
            row = out_rows[r]
            row["scores"][i] = logp[r, cand_ids[r]]
            j = int(pick(row["scores"][i], set(row["chosen"])))
            row["chosen"].append(j)
            row["ids"].append(cand_ids[r][j])
            row["mask"].append(1)
            pending[r] = [cand_ids[r][j]]
    return out_rows


def _best_unused(scores: np.ndarray, used: set) -> int:
    return next(j for j in np.argsort(-scores) if j not in used)


def constrained_batch(model, tok, puzzles: Sequence[Puzzle], k: int) -> list[tuple[str, np.ndarray]]:
    """(completion, cells x candidates score matrix) per puzzle, as ``decode.constrained``."""
    results = []
    for p, row in zip(puzzles, fill_slots(model, tok, puzzles, k)):
        labels = assign_labels(row["scores"], p.candidates)
        results.append((format_completion(think_lines(p, k, labels), labels), row["scores"]))
    return results

"""Decoding a model's answers to puzzles: free and constrained.

free         the model's own text (greedy by default, sampling optional), scored as is.
constrained  every (cell, candidate) pair is scored by the log-likelihood of that candidate
             at that cell's slot (the prefix holds the slots before it, filled greedily
             among unused candidates); the cells x candidates matrix is assigned one-to-one
             (Hungarian), so the answer is always a valid permutation. The slots are the
             type slots of the per-cell scaffold (``cellpuzzles.task.scaffold``) for a model
             trained on scaffold traces, else the answer slots after the model's own
             <think> part."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cellpuzzles.inference.budget import new_token_budget
from cellpuzzles.inference.prompting import prompt_text
from cellpuzzles.inference.slot_tails import common_len
from cellpuzzles.task.puzzle import Puzzle, think_part


@dataclass
class DecodeOptions:
    max_new_tokens: int | None = None  # None: the model's budget (inference.budget) from tokens_per_cell
    tokens_per_cell: float | None = None  # the model folder's (PromptOptions.tokens_per_cell); None: estimated
    do_sample: bool = False  # False: greedy, whatever the model's generation_config says
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 32
    seed: int = 0

    def generation_config(self, tok, budget: int):
        """Exactly these settings: a model's own generation_config (Qwen's ships sampling, top_k 20 and
        a repetition penalty) must not turn greedy into something else."""
        from transformers import GenerationConfig

        sampling = dict(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=0, min_p=0.0) \
            if self.do_sample else {}
        return GenerationConfig(**{**NEUTRAL, **sampling}, max_new_tokens=budget, pad_token_id=tok.pad_token_id,
                                eos_token_id=tok.eos_token_id)


# every generation setting that changes which token is picked, at its "no effect" value: set
# explicitly, since generate() fills unset (None) values from the model's own generation_config
# (top_k: the library's default, unused by greedy; sampling sets it to 0, no top-k filtering)
NEUTRAL = dict(do_sample=False, temperature=1.0, top_p=1.0, top_k=50, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0,
               repetition_penalty=1.0, encoder_repetition_penalty=1.0, no_repeat_ngram_size=0,
               encoder_no_repeat_ngram_size=0, min_new_tokens=0, num_beams=1, length_penalty=1.0)


def generate(model, tok, puzzles: Sequence[Puzzle], opt: DecodeOptions | None = None, progress=None) -> list[str]:
    """Completions for puzzles (already in the model's prompt form), in order."""
    import torch

    opt = opt or DecodeOptions()
    model.eval()
    order = sorted(range(len(puzzles)), key=lambda i: (puzzles[i].n, len(puzzles[i].user_msg)))
    out: list[str] = [""] * len(puzzles)
    torch.manual_seed(opt.seed)
    for start in range(0, len(order), opt.batch_size):
        idx = order[start:start + opt.batch_size]
        texts = [prompt_text(tok, puzzles[i]) for i in idx]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        budget = opt.max_new_tokens or new_token_budget(tok, [puzzles[i] for i in idx], opt.tokens_per_cell)
        with torch.no_grad():
            gen = model.generate(**enc, generation_config=opt.generation_config(tok, budget))
        new = gen[:, enc["input_ids"].shape[1]:]
        for i, text in zip(idx, tok.batch_decode(new, skip_special_tokens=True)):
            out[i] = text
        if progress:
            progress(len(idx))
    return out


class PrefixCache:
    """The KV cache of the longest token prefix seen so far: successive answer slots of one
    puzzle share the prompt and reasoning, so only the new tokens run through the model."""

    SHORT = 16  # a new stretch up to this long runs once per candidate, fused with the candidates

    def __init__(self, model):
        self.model, self.ids, self.cache, self.branched = model, [], None, None

    def _rewind(self, ids: Sequence[int]) -> int:
        """Drop cached tokens that ``ids`` does not share; keep at least one token of ``ids`` to run."""
        keep = min(common_len(self.ids, ids), len(ids) - 1)
        if self.cache is not None and keep < len(self.ids):
            try:
                self.cache.crop(keep - len(self.ids))  # negative: tokens to drop from the end
            except (ValueError, NotImplementedError):
                self.cache, keep = None, 0
        if keep == 0:
            self.cache = None
        self.ids = list(self.ids[:keep])
        return keep

    def advance(self, ids: Sequence[int]):
        """Log-probabilities of the next token after ``ids``; the cache then holds ``ids``."""
        import torch

        keep = self._rewind(ids)
        new = torch.tensor([list(ids[keep:])], device=self.model.device)
        with torch.no_grad():
            out = self.model(input_ids=new, cache=self.cache, use_cache=True)
        self.cache, self.ids, self.branched = out.cache, list(ids), None
        return torch.log_softmax(out.logits[0, -1].float(), -1)

    def can_fuse(self, ids: Sequence[int]) -> bool:
        return self.cache is not None and len(ids) - common_len(self.ids, ids) <= self.SHORT

    def branch(self, ids: Sequence[int], tails: list[list[int]], pad: int):
        """One forward pass of ``ids``' new tokens followed by each tail (one row per tail);
        returns the log-probabilities (rows × positions × vocab) and the number of new
        tokens before the tails. ``commit(j)`` then keeps row j as the cached prefix."""
        import copy

        import torch

        keep = self._rewind(ids)
        delta = list(ids[keep:])
        width = max(len(t) for t in tails)
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(len(tails))
        rows = torch.tensor([delta + t + [pad] * (width - len(t)) for t in tails], device=self.model.device)
        mask = torch.ones((len(tails), keep + len(delta) + width), dtype=torch.long, device=self.model.device)
        with torch.no_grad():
            logits = self.model(input_ids=rows, cache=cache, attention_mask=mask, use_cache=True).logits
        self.branched = (cache, list(ids), tails, width)
        return torch.log_softmax(logits.float(), -1), len(delta)

    def commit(self, j: int) -> None:
        """After ``branch``: the cache holds the prefix followed by tail ``j``."""
        import torch

        if self.branched is None:
            return
        cache, ids, tails, width = self.branched
        cache.batch_select_indices(torch.tensor([j], device=self.model.device))
        if width > len(tails[j]):
            cache.crop(len(tails[j]) - width)  # drop row j's padding
        self.cache, self.ids, self.branched = cache, ids + tails[j], None


def slot_scores(model, tok, prefix: str, candidates: Sequence[str], state: PrefixCache | None = None) -> np.ndarray:
    """log p(candidate text | prefix) for each candidate. The prefix's KV cache is shared by
    all candidates; given the ``state`` of an earlier slot only its new tokens run, fused
    with the candidates into one forward pass when they are few."""
    import copy

    import torch

    p_ids, *full = tok([prefix, *(prefix + c for c in candidates)], add_special_tokens=False)["input_ids"]
    # tokens can merge across the boundary: share only the prefix every candidate keeps
    common = min(common_len(p_ids, f) for f in full)
    common = max(1, min(common, len(p_ids)))
    state = state or PrefixCache(model)
    head = full[0][:common]
    tails = [f[common:] for f in full]
    width = max(len(t) for t in tails)
    if width == 0:
        return np.zeros(len(candidates))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    if all(len(t) == 1 for t in tails):
        # one token each (the tiny model's types): the next-token distribution after the
        # prefix scores them all; no candidate rows, no cache copy
        first = state.advance(head)
        return np.array([first[t[0]].item() for t in tails])
    if state.can_fuse(head):
        logp, d = state.branch(head, tails, pad)
        first = None
    else:
        first = state.advance(head)
        ids = torch.tensor([t + [pad] * (width - len(t)) for t in tails], device=model.device)
        cache = copy.deepcopy(state.cache)
        cache.batch_repeat_interleave(len(candidates))
        mask = torch.ones((len(candidates), common + width), dtype=torch.long, device=model.device)
        with torch.no_grad():
            logits = model(input_ids=ids, cache=cache, attention_mask=mask, use_cache=True).logits.float()
        logp, d = torch.log_softmax(logits, -1), 0
    scores = np.zeros(len(candidates))
    for j, t in enumerate(tails):
        if not t:
            continue
        s = first[t[0]].item() if first is not None else logp[j, d - 1, t[0]].item()
        for k in range(1, len(t)):
            s += logp[j, d + k - 1, t[k]].item()
        scores[j] = s
    return scores



def constrained(model, tok, puzzle: Puzzle, completion: str, restated_genes: int | None = None) -> tuple[str, np.ndarray]:
    """A valid completion for one puzzle from the model's likelihoods, and its score matrix.

    With ``restated_genes`` (a model trained on scaffold traces, ``cellpuzzles.task.scaffold``)
    the think part is the scaffold and each cell is scored at its line's type slot; the
    model's own completion is not needed. Otherwise the model's own think part is kept and
    the cells are scored at the answer slots. Each slot's earlier slots hold the best unused
    candidates; every candidate is scored as the tokenizer encodes it in place
    (``cellpuzzles.inference.slot_tails``). The same path as ``constrained_many``, batch of one."""
    from cellpuzzles.inference.scaffold_batch import constrained_batch

    return constrained_batch(model, tok, [puzzle], restated_genes, [think_part(completion)])[0]


def constrained_many(model, tok, puzzles: Sequence[Puzzle], completions: Sequence[str],
                     restated_genes: int | None = None, batch_size: int = 32) -> list[str]:
    """``constrained`` for many puzzles, ``batch_size`` puzzles per forward pass (similar
    lengths together), candidate names of any token length (``cellpuzzles.inference.scaffold_batch``)."""
    from cellpuzzles.inference.scaffold_batch import constrained_batch

    order = sorted(range(len(puzzles)), key=lambda i: (puzzles[i].n, len(puzzles[i].user_msg)))
    out: list[str] = [""] * len(puzzles)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        done = constrained_batch(model, tok, [puzzles[i] for i in idx], restated_genes,
                                 [think_part(completions[i]) for i in idx])
        for i, (c, _) in zip(idx, done):
            out[i] = c
    return out

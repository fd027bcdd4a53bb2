"""Filling the answer slots of many puzzles at once, for candidate names of any token length.

Each puzzle comes as a ``Layout``: the environment's text before each slot (the scaffold line,
or the separator) and the text after the last one. At slot i, every puzzle's candidates are
tokenized canonically in place (``slot_tails``): the shared ``head`` (the environment's
tokens) and one ``tail`` per candidate (the decision's tokens). One forward pass per slot
then runs, for every puzzle of the batch, its new head tokens on top of a shared KV cache
followed by its candidates' token trie (each distinct tail prefix once), with a 4D attention
mask so that a trie node sees the cache, the new head tokens and its own ancestors only, and
explicit positions (a node sits at the position its token would have in the text). The trie
part is then cropped from the cache; the chosen candidate's tokens run again as the next
slot's head. So every candidate's score is log p(its tail | everything before) from one pass,
and a name of one token (the tiny model's) needs no trie at all.

``pick(scores, used, tails, steps)`` chooses the candidate written at each slot: the best one
not used yet (constrained decoding), or a sample through the trie of the free candidates
(``TrieSampler``, RL rollouts). Per puzzle the result holds the score matrix, the choices and
the completion's canonical token ids with the decision mask, per-token log-likelihoods and,
at each decision token, the token ids the free candidates allowed there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from cellpuzzles.inference.slot_tails import common_len, slot_tails


@dataclass
class Layout:
    """One puzzle's completion: ``before(i)`` is the environment's text before slot i (i = 0:
    the opening; else the separator and the next line), ``closing(labels)`` the text after the
    last slot given the labels written."""

    candidates: list[str]
    before: Callable[[int], str]
    closing: Callable[[list[str]], str]
    n: int


@dataclass
class Filled:
    scores: np.ndarray
    chosen: list[int] = field(default_factory=list)
    text: str = ""
    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logps: list[float] = field(default_factory=list)
    allowed: list[list[int]] = field(default_factory=list)  # per decision token (mask 1)


def best_unused(scores: np.ndarray, used: set, tails=None, steps=None) -> int:
    return next(int(j) for j in np.argsort(-scores, kind="stable") if j not in used)


class TrieSampler:
    """Sample a free candidate token by token through the trie of the free candidates' tails,
    each token with probability ~ exp(logp / temperature) among the tokens the free candidates
    allow at that point: the policy PPO's environment hook evaluates (``ppo_env_tokens``)."""

    def __init__(self, temperature: float, rng):
        self.t, self.rng = max(float(temperature), 1e-6), rng

    def __call__(self, scores, used, tails, steps) -> int:
        alive = [j for j in range(len(tails)) if j not in used]
        k = 0
        while True:
            done = [j for j in alive if len(tails[j]) == k]
            if done:
                return done[0]
            options: dict[int, float] = {}
            for j in alive:
                options.setdefault(tails[j][k], float(steps[j][k]))
            toks = list(options)
            z = np.array([options[t] for t in toks]) / self.t
            p = np.exp(z - z.max())
            t = toks[int(self.rng.choice(len(toks), p=p / p.sum()))]
            alive = [j for j in alive if tails[j][k] == t]
            k += 1


def allowed_tokens(tails: list[list[int]], used: set, chosen: int) -> list[list[int]]:
    """At each token of ``tails[chosen]``, the token ids free candidates sharing its path allow."""
    out = []
    alive = [j for j in range(len(tails)) if j not in used]
    for k, t in enumerate(tails[chosen]):
        out.append(sorted({tails[j][k] for j in alive}))
        alive = [j for j in alive if tails[j][k] == t]
    return out


def fill_slots(model, tok, prompts: Sequence[list[int]], layouts: Sequence[Layout], pick=None) -> list[Filled]:
    """Write every puzzle's slots, slot i of all puzzles in one forward pass (module docstring).
    ``prompts``: each puzzle's prompt token ids (the completion's ids follow them)."""
    import torch

    pick = pick or best_unused
    model.eval()
    B = len(layouts)
    dev = model.device
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    rows = [Filled(scores=np.zeros((lay.n, len(lay.candidates)))) for lay in layouts]
    queued = [list(p) for p in prompts]  # ids to run before the next slot's trie
    lengths = [0] * B  # real tokens each row holds in the cache
    seen = torch.zeros((B, 0), dtype=torch.bool)  # which cache columns are real, per row
    cuts = [(0, 0)] * B  # per row: (chars, ids) of a completion prefix encoded once for all
    cache = None
    act = list(range(B))  # the rows in the cache, in its order
    for i in range(max(lay.n for lay in layouts)):
        live = [r for r in act if i < layouts[r].n]
        if cache is not None and live != act:  # finished rows leave the batch
            keep = [act.index(r) for r in live]
            cache.batch_select_indices(torch.tensor(keep, device=dev))
            seen = seen[keep]
        act = live
        tails: dict[int, list[list[int]]] = {}
        for r in live:
            lay, row = layouts[r], rows[r]
            text = row.text + lay.before(i)
            after = lay.before(i + 1) if i + 1 < lay.n else lay.closing([lay.candidates[j] for j in row.chosen] + ["?"])
            head, tails[r] = _tails(tok, row, cuts, r, text, lay.candidates, after)
            if head[: len(row.ids)] != row.ids:
                raise RuntimeError(f"slot {i}: the canonical tokens of the text so far changed ({text[-60:]!r})")
            forced = head[len(row.ids):]
            row.text = text
            row.ids += forced
            row.mask += [0] * len(forced)
            row.logps += [0.0] * len(forced)
            queued[r] += forced
        if cache is None:  # the prompts: each alone (no padding), then one left-padded cache
            cache, seen = _prefill(model, [queued[r][:-1] for r in act], dev)
            for r in act:
                lengths[r], queued[r] = len(queued[r]) - 1, queued[r][-1:]
        steps_by_row, cache, seen = _forward(model, cache, seen, [lengths[r] for r in act], [queued[r] for r in act],
                                             [tails[r] for r in act], pad, dev)
        for b, r in enumerate(act):
            lay, row = layouts[r], rows[r]
            lengths[r] += len(queued[r])
            steps = steps_by_row[b]
            row.scores[i] = [s.sum() for s in steps]
            used = set(row.chosen)
            j = int(pick(row.scores[i], used, tails[r], steps))
            row.allowed += allowed_tokens(tails[r], used, j)
            row.chosen.append(j)
            row.text += lay.candidates[j]
            row.ids += tails[r][j]
            row.mask += [1] * len(tails[r][j])
            row.logps += [float(x) for x in steps[j]]
            queued[r] = list(tails[r][j])
    for lay, row in zip(layouts, rows):
        row.text += lay.closing([lay.candidates[j] for j in row.chosen])
        full = tok(row.text, add_special_tokens=False)["input_ids"]
        if full[: len(row.ids)] != row.ids:
            raise RuntimeError(f"the decided tokens are not a prefix of the completion's canonical tokens ({row.text[-80:]!r})")
        rest = full[len(row.ids):]
        row.ids += rest
        row.mask += [0] * len(rest)
        row.logps += [0.0] * len(rest)
    return rows


def _tails(tok, row: Filled, cuts: list, r: int, text: str, candidates: list[str], after: str):
    """``slot_tails`` encoding only the text after the row's last line start (a newline: the
    tokenizer starts a new piece after it), checked against the whole text for one candidate;
    a row whose check fails is encoded whole from then on. Returns (head, tails)."""
    chars, n = cuts[r] or (0, 0)
    head, tails, ends = slot_tails(tok, text, candidates, after, chars)
    head = row.ids[:n] + head
    if chars:
        whole = tok(text + candidates[0] + after, add_special_tokens=False)["input_ids"]
        if whole[: len(head) + len(tails[0])] != head + tails[0]:
            cuts[r] = None
            head, tails, ends = slot_tails(tok, text, candidates, after)
            return head, tails
    if cuts[r] is not None:
        line = text.rfind("\n") + 1
        if line > chars and line in ends:
            cuts[r] = (line, n + ends.index(line) + 1)
    return head, tails


def _prefill(model, seqs: list[list[int]], dev):
    """The KV cache of each sequence, stacked into one cache left-padded to the longest; returns
    it and the real-column mask. The prefix all sequences share (the chat template and the
    system message) runs once; each distinct sequence's own rest then runs alone on a copy of
    its cache (no padding: the model's own causal path)."""
    import torch
    from transformers import DynamicCache

    width = max(len(s) for s in seqs)
    shared = min(len(s) for s in seqs)
    for s in seqs[1:]:
        shared = min(shared, common_len(seqs[0], s))
    shared = min(shared, min(len(s) for s in seqs) - 1)  # every row keeps a token of its own to run
    per_row = []
    with torch.no_grad():
        head = None
        if shared > 0:
            out = model(input_ids=torch.tensor([seqs[0][:shared]], device=dev), use_cache=True, logits_to_keep=1)
            head = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        done: dict[tuple, list] = {}  # a sequence seen before (GRPO's group) runs once
        for s in seqs:
            if tuple(s) not in done:
                past = DynamicCache(ddp_cache_data=[(k.clone(), v.clone()) for k, v in head], config=model.config) \
                    if head else None
                out = model(input_ids=torch.tensor([s[shared:]], device=dev), past_key_values=past, use_cache=True,
                            logits_to_keep=1)
                done[tuple(s)] = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
            per_row.append(done[tuple(s)])

    def padded(x, n):  # [1, heads, n, dim] -> [1, heads, width, dim], zeros on the left
        return torch.cat([x.new_zeros(x.shape[0], x.shape[1], width - n, x.shape[3]), x], 2) if n < width else x

    layers = [(torch.cat([padded(r[i][0], len(s)) for r, s in zip(per_row, seqs)]),
               torch.cat([padded(r[i][1], len(s)) for r, s in zip(per_row, seqs)])) for i in range(len(per_row[0]))]
    seen = torch.zeros((len(seqs), width), dtype=torch.bool)
    for r, s in enumerate(seqs):
        seen[r, width - len(s):] = True
    return DynamicCache(ddp_cache_data=layers, config=model.config), seen


def _forward(model, cache, seen, lengths, queued, tails, pad, dev):
    """One pass: each row's queued ids (left-padded to a common width D) then its trie nodes
    (right-padded to T). Returns per row and candidate the log-probability of each tail token
    (the first after the row's last queued token, the others after their trie node), the
    cache with the trie columns dropped, and the real-column mask."""
    import torch

    B = len(queued)
    D = max(1, max(len(q) for q in queued))
    node_maps: list[dict[tuple, int]] = []
    for r in range(B):
        m: dict[tuple, int] = {}
        for t in tails[r]:
            for k in range(1, len(t)):
                m.setdefault(tuple(t[:k]), len(m))
        node_maps.append(m)
    T = max((len(m) for m in node_maps), default=0)
    K = seen.shape[1]
    W = D + T
    ids = np.full((B, W), pad, dtype=np.int64)
    pos = np.zeros((B, W), dtype=np.int64)
    new = np.zeros((B, W, W), dtype=bool)  # who sees whom among this pass's columns
    tril = np.tril(np.ones((D, D), dtype=bool))
    for r in range(B):
        q = queued[r]
        a = D - len(q)
        ids[r, a:D] = q
        pos[r, a:D] = np.arange(lengths[r], lengths[r] + len(q))
        new[r, a:D, a:D] = tril[a:, a:]
        base = lengths[r] + len(q)
        for node, c in node_maps[r].items():
            col = D + c
            ids[r, col] = node[-1]
            pos[r, col] = base + len(node) - 1
            new[r, col, a:D] = True
            for k in range(1, len(node) + 1):  # its ancestors and itself
                new[r, col, D + node_maps[r][node[:k]]] = True
    new_seen = torch.from_numpy(new[np.arange(B), D - 1, :D].copy())  # the real queued columns
    new = torch.from_numpy(new)
    allow = torch.cat([seen[:, None, :].expand(B, W, K), new], 2)
    # a padding query with nothing to see attends to itself (no NaN; its output is unused)
    lonely = ~allow.any(-1)
    allow[:, :, K:] |= torch.diag_embed(lonely)
    if model.config._attn_implementation == "sdpa":
        mask = allow[:, None]  # SDPA takes the boolean mask as it is (True: attend)
    else:  # eager and others add the mask to the scores
        dtype = next(model.parameters()).dtype
        mask = torch.zeros(allow.shape, dtype=dtype).masked_fill_(~allow, torch.finfo(dtype).min)[:, None]
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids).to(dev), attention_mask=mask.to(dev),
                    position_ids=torch.from_numpy(pos).to(dev), past_key_values=cache, use_cache=True,
                    logits_to_keep=T + 1)
    cache = out.past_key_values
    if T:
        cache.crop(-T)  # drop the trie columns
    # logits column 0 predicts after the last queued token, column 1 + c after trie node c
    where = [(r, 0 if k == 0 else 1 + node_maps[r][tuple(t[:k])], t[k])
             for r, ts in enumerate(tails) for t in ts for k in range(len(t))]
    logp = torch.log_softmax(out.logits.float(), -1)
    rr, cc, tt = (torch.tensor(x, device=dev) for x in zip(*where))
    vals = iter(logp[rr, cc, tt].cpu().numpy().astype(np.float64))
    steps = [[np.array([next(vals) for _ in t]) for t in ts] for ts in tails]
    return steps, cache, torch.cat([seen, new_seen], 1)

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

from cellpuzzles.inference import gqa_attention
from cellpuzzles.inference.slot_tails import common_len, encode_slot, slot_tails


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
    ``prompts``: each puzzle's prompt token ids (the completion's ids follow them). The passes
    share the key/value heads under their masks (``gqa_attention``) where the model allows."""
    with gqa_attention.gqa_sdpa(model):
        return _fill_slots(model, tok, prompts, layouts, pick or best_unused)


def _fill_slots(model, tok, prompts, layouts, pick) -> list[Filled]:
    import torch

    model.eval()
    B = len(layouts)
    dev = model.device
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    rows = [Filled(scores=np.zeros((lay.n, len(lay.candidates)))) for lay in layouts]
    queued = [list(p) for p in prompts]  # ids to run before the next slot's trie
    lengths = [0] * B  # real tokens each row holds in the cache
    seen = torch.zeros((B, 0), dtype=torch.bool)  # which cache columns are real, per row
    cuts = [(0, [], (0, 0))] * B  # per row: (chars, ids) of a completion prefix encoded once for all, the cut before
    nexts = {}  # per row: the cut after each candidate
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
            head, tails[r], nexts[r] = _tails(tok, cuts[r], text, lay.candidates, after)
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
            cuts[r] = nexts[r][j]
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


def _tails(tok, cut, text: str, candidates: list[str], after: str):
    """``slot_tails`` encoding only the text between two line starts (a newline then a non-space:
    the tokenizer starts a new piece there): from ``cut`` = (chars, the ids of ``text[:chars]``,
    the cut before it), the row's last one, through the first one in ``after``; checked for one
    candidate against the encoding of the text from the cut before (itself checked so, back to
    the completion's start). Returns (head, tails, per candidate the cut the next slot starts
    from); a row whose check fails (cut None) is encoded whole from then on."""
    if cut is None:
        head, tails, _ = slot_tails(tok, text, candidates, after)
        return head, tails, [None] * len(candidates)
    chars, known, (back, n) = cut
    stop = next((p for p in range(1, len(after)) if after[p - 1] == "\n" and not after[p].isspace()), len(after))
    head, tails, ends, ids = encode_slot(tok, text, candidates, after[:stop], chars)
    head = known + head
    if chars or stop < len(after):
        want = (head + tails[0])[n:]
        if tok(text[back:] + candidates[0] + after, add_special_tokens=False)["input_ids"][: len(want)] != want:
            head, tails, _ = slot_tails(tok, text, candidates, after)
            return head, tails, [None] * len(candidates)
    here = (chars, len(known))
    if stop < len(after):  # the next slot's text is this one's, the candidate and after
        return head, tails, [(len(text) + len(c) + stop, known + x, here) for c, x in zip(candidates, ids)]
    line = text.rfind("\n") + 1
    if line > chars and line in ends:
        cut = (line, head[: len(known) + ends.index(line) + 1], here)
    return head, tails, [cut] * len(candidates)


def _prefill(model, seqs: list[list[int]], dev):
    """The KV cache of each sequence, stacked into one cache left-padded to the longest; returns
    it and the real-column mask. The prefix all sequences share (the chat template and the
    system message) runs once; the distinct sequences' own rests then run on it in groups of
    similar lengths (``_similar``), right-padded: a real token never sees the padding after it,
    whose columns are dropped."""
    import torch
    from transformers import DynamicCache

    width = max(len(s) for s in seqs)
    shared = min(len(s) for s in seqs)
    for s in seqs[1:]:
        shared = min(shared, common_len(seqs[0], s))
    shared = min(shared, min(len(s) for s in seqs) - 1)  # every row keeps a token of its own to run
    rests = sorted({tuple(s[shared:]) for s in seqs}, key=len)  # a sequence seen twice (GRPO's group) runs once
    done: dict[tuple, list] = {}
    with torch.no_grad():
        head = None
        if shared > 0:
            out = model(input_ids=torch.tensor([seqs[0][:shared]], device=dev), use_cache=True, logits_to_keep=1)
            head = [(layer.keys, layer.values) for layer in out.cache.layers]
        for group in _similar(rests):
            n = len(group[-1])
            ids = torch.tensor([list(r) + [r[-1]] * (n - len(r)) for r in group], device=dev)
            past = DynamicCache(ddp_cache_data=[(k.expand(len(group), -1, -1, -1), v.expand(len(group), -1, -1, -1))
                                                for k, v in head], config=model.config) if head else None
            causal = torch.ones((1, n, shared + n), dtype=torch.bool).tril(shared)  # the same for every row
            out = model(input_ids=ids, cache=past, use_cache=True, logits_to_keep=1,
                        attention_mask=_additive(model, causal[:, :, shared:], causal[:, 0, :shared]))
            for b, r in enumerate(group):
                done[r] = [(layer.keys[b:b + 1, :, :shared + len(r)], layer.values[b:b + 1, :, :shared + len(r)])
                           for layer in out.cache.layers]
    per_row = [done[tuple(s[shared:])] for s in seqs]

    def padded(x, n):  # [1, heads, n, dim] -> [1, heads, width, dim], zeros on the left
        return torch.cat([x.new_zeros(x.shape[0], x.shape[1], width - n, x.shape[3]), x], 2) if n < width else x

    layers = [(torch.cat([padded(r[i][0], len(s)) for r, s in zip(per_row, seqs)]),
               torch.cat([padded(r[i][1], len(s)) for r, s in zip(per_row, seqs)])) for i in range(len(per_row[0]))]
    seen = torch.zeros((len(seqs), width), dtype=torch.bool)
    for r, s in enumerate(seqs):
        seen[r, width - len(s):] = True
    return DynamicCache(ddp_cache_data=layers, config=model.config), seen


def _similar(rests: list[tuple], slack: float = 1.15) -> list[list[tuple]]:
    """``rests`` (sorted by length) in runs of similar lengths: a run padded to its longest
    holds at most ``slack`` times its real tokens."""
    groups: list[list[tuple]] = []
    for r in rests:
        g = groups[-1] if groups else None
        if g is not None and (len(g) + 1) * len(r) <= slack * (sum(map(len, g)) + len(r)):
            g.append(r)
        else:
            groups.append([r])
    return groups


def _trie(tails: list[list[int]]):
    """One row's candidate trie: each distinct proper prefix of a tail is a node, numbered as
    first met (a parent before its children). Returns the nodes' last tokens, their depths
    (1: a tail's first token), who sees whom among them (its ancestors and itself), and per
    tail the logits column each token is predicted from (0: after the head, 1 + c: after node c)."""
    root: dict = {}  # token -> (node, its children)
    toks, depth, parent, cols = [], [], [], []
    for t in tails:
        at, level = [0], root
        for k in range(1, len(t)):
            if t[k - 1] not in level:
                level[t[k - 1]] = (len(toks), {})
                toks.append(t[k - 1])
                depth.append(k)
                parent.append(at[-1] - 1)
            c, level = level[t[k - 1]]
            at.append(1 + c)
        cols.append(at)
    sees = np.zeros((len(toks), len(toks)), dtype=bool)
    for c, p in enumerate(parent):
        if p >= 0:
            sees[c] = sees[p]
        sees[c, c] = True
    return toks, depth, sees, cols


def _additive(model, new, seen):
    """The attention mask [rows, 1, queries, cache + new columns] as the model adds it to the
    scores, made once for all layers (a boolean one is converted in every layer): 0 where a
    query sees a column (the cache's columns ``seen``, then ``new``), else -inf for SDPA (what
    it makes of a boolean mask: the same scores), the dtype's minimum for others."""
    import torch

    dtype = next(model.parameters()).dtype
    floor = float("-inf") if model.config._attn_implementation in ("sdpa", gqa_attention.NAME) \
        else torch.finfo(dtype).min
    (B, W), K = new.shape[:2], seen.shape[1]
    mask = torch.full((B, W, K + W), floor, dtype=dtype)
    mask[:, :, :K].masked_fill_(seen[:, None, :], 0)
    mask[:, :, K:].masked_fill_(new, 0)
    return mask[:, None].to(model.device)


def _forward(model, cache, seen, lengths, queued, tails, pad, dev):
    """One pass: each row's queued ids (left-padded to a common width D) then its trie nodes
    (right-padded to T). Returns per row and candidate the log-probability of each tail token
    (the first after the row's last queued token, the others after their trie node), the
    cache with the trie columns dropped, and the real-column mask."""
    import torch

    B = len(queued)
    D = max(1, max(len(q) for q in queued))
    tries = [_trie(ts) for ts in tails]
    T = max(len(tr[0]) for tr in tries)
    W = D + T
    ids = np.full((B, W), pad, dtype=np.int64)
    pos = np.zeros((B, W), dtype=np.int64)
    new = np.zeros((B, W, W), dtype=bool)  # who sees whom among this pass's columns
    tril = np.tril(np.ones((D, D), dtype=bool))
    for r, (toks, depth, sees, _) in enumerate(tries):
        q, n = queued[r], len(toks)
        a = D - len(q)
        ids[r, a:D] = q
        pos[r, a:D] = np.arange(lengths[r], lengths[r] + len(q))
        new[r, a:D, a:D] = tril[a:, a:]
        ids[r, D:D + n] = toks
        pos[r, D:D + n] = np.asarray(depth, dtype=np.int64) + (lengths[r] + len(q) - 1)
        new[r, D:D + n, a:D] = True  # a node sees the queued ids, its ancestors and itself
        new[r, D:D + n, D:D + n] = sees
    new_seen = torch.from_numpy(new[np.arange(B), D - 1, :D].copy())  # the real queued columns
    new = torch.from_numpy(new)
    # a padding query with nothing to see attends to itself (no NaN; its output is unused)
    lonely = ~(seen.any(1)[:, None] | new.any(2))
    mask = _additive(model, new | torch.diag_embed(lonely), seen)
    # the output layer runs on the (row, logits column) pairs some tail token needs only
    at = np.array([r * (T + 1) + c for r, tr in enumerate(tries) for cs in tr[3] for c in cs], dtype=np.int64)
    cols, inv = np.unique(at, return_inverse=True)
    cols = torch.from_numpy(cols).to(dev)
    hook = model.get_output_embeddings().register_forward_pre_hook(
        lambda _, args: (args[0].reshape(-1, args[0].shape[-1])[cols], *args[1:]))
    try:
        with torch.no_grad():
            out = model(input_ids=torch.from_numpy(ids).to(dev), attention_mask=mask,
                        position_ids=torch.from_numpy(pos).to(dev), cache=cache, use_cache=True,
                        logits_to_keep=T + 1)
    finally:
        hook.remove()
    cache = out.cache
    if T:
        cache.crop(-T)  # drop the trie columns
    tt = torch.tensor([x for ts in tails for t in ts for x in t], device=dev)
    logp = out.logits.float()
    logp = torch.log_softmax(logp, -1, out=logp)[torch.from_numpy(inv).to(dev), tt]  # in place: one big array less
    flat = np.split(logp.cpu().numpy().astype(np.float64), np.cumsum([len(t) for ts in tails for t in ts])[:-1])
    steps, k = [], 0
    for ts in tails:
        steps.append(flat[k:k + len(ts)])
        k += len(ts)
    return steps, cache, torch.cat([seen, new_seen], 1)

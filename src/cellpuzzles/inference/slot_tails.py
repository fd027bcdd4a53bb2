"""Which tokens decide a slot: the canonical tokenization of every candidate at one answer slot.

At a slot the completion so far is ``text`` (ending right before the label) and the text
after the label is ``after`` (the next scaffold line, the separator, the closing tags). For
each candidate the tokenizer encodes ``text + candidate + after`` as one string, exactly as
the finished completion will be encoded, so merges across the boundary (a byte-level BPE's
``'Ġ->'`` then ``'ĠCD'``: the space before a name joins it; ``'+Ċ'``: a name's last
character joins the newline after it) are the tokenizer's own. Split by character offsets:

``head``   the tokens every candidate shares that lie wholly inside ``text`` (the environment's);
``tails``  per candidate, the tokens from there through the one holding the label's last
           character (the decision). When some candidate's last token reaches into ``after``
           (``'+Ċ'``), or one candidate's tokens are a prefix of another's (``'ĠT'`` vs
           ``'ĠT','ĠReg'``), every tail is taken through the token holding ``after``'s first
           character, so all candidates are scored over the same text and no tail is a
           prefix of another (the candidates form a token trie whose leaves are the names).

A word-level tokenizer whose names are single tokens gets one-token tails.
"""

from __future__ import annotations

from collections.abc import Sequence


def slot_tails(tok, text: str, candidates: Sequence[str], after: str,
               start: int = 0) -> tuple[list[int], list[list[int]], list[int]]:
    """(head ids, tail ids per candidate, the head tokens' end offsets in ``text``) at the slot
    after ``text``; see the module docstring. With ``start`` only ``text[start:]`` is encoded (the
    caller knows the ids before it: ``start`` must be a point the tokenizer never merges across)."""
    return encode_slot(tok, text, candidates, after, start)[:3]


def encode_slot(tok, text: str, candidates: Sequence[str], after: str, start: int = 0):
    """``slot_tails`` and, per candidate, the ids of the whole string encoded
    (``text[start:] + candidate + after``)."""
    text, shift = text[start:], start
    enc = tok([text + c + after for c in candidates], add_special_tokens=False, return_offsets_mapping=True)
    ids, offs = enc["input_ids"], enc["offset_mapping"]
    # the head: tokens shared by all, ending inside the text
    n = min(common_len(ids[0], x) for x in ids)
    n = next((k for k in range(n) if offs[0][k][1] > len(text)), n)
    ends = [len(text) + len(c) for c in candidates]

    def through(j: int, last_char: int) -> list[int]:  # tail tokens starting before last_char
        k = n
        while k < len(ids[j]) and offs[j][k][0] < last_char:
            k += 1
        return ids[j][n:k]

    tails = [through(j, e) for j, e in enumerate(ends)]
    merged = any(offs[j][n + len(t) - 1][1] > ends[j] for j, t in enumerate(tails) if t)
    if merged or not _prefix_free(tails):
        tails = [through(j, e + 1) for j, e in enumerate(ends)]
    if not all(tails) or not _prefix_free(tails):
        raise ValueError(f"slot after {text[-40:]!r}: candidates {list(candidates)} do not tokenize to distinct "
                         "token paths")
    return ids[0][:n], tails, [shift + e for _, e in offs[0][:n]], ids


def _prefix_free(tails: list[list[int]]) -> bool:
    ts = sorted(tuple(t) for t in tails)
    return all(a != b[: len(a)] for a, b in zip(ts, ts[1:]))


def common_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n

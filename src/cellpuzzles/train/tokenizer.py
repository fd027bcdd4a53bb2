"""A word-level tokenizer for the tiny default model, trained offline on the puzzle corpus.

Pieces are the puzzle format's own units: each gene symbol, each cell-type name, "Cell k",
the delimiters (", ", " | ", ": ", "\\n", ...), and whole fixed phrases (the system
message, the match line) as single tokens. The chat template is ChatML.

It is saved as what the model's config says it is, a ``Qwen2Tokenizer``, so that plain
``AutoTokenizer`` (and vLLM, KServe's runtime, TRL scripts) rebuild exactly this tokenizer:
the byte-level BPE has the 256 byte symbols and no merges, and every word-level piece is an
added (non-special) token, matched leftmost-longest before the BPE runs. Text made of known
pieces therefore gets one id per piece, as a word-level tokenizer would; unknown text falls
back to bytes instead of ``<|unk|>``, so ``decode(encode(text)) == text`` for any text.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers, trainers

from cellpuzzles.task.puzzle import MATCH_LINE, SYSTEM_MSG

PAD, UNK, BOS, EOS = "<|pad|>", "<|unk|>", "<|im_start|>", "<|im_end|>"
SPECIALS = (PAD, UNK, BOS, EOS)
TAGS = ("<think>", "</think>", "<answer>", "</answer>")
DELIMITER_PIECES = ("\n", ", ", " | ", ": ", "; ", ". ", " -> ", " taken by ")
DELIMITERS = "|".join(re.escape(d) for d in DELIMITER_PIECES)
MAX_CELLS = 64
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{%- endif %}"
)
BYTES = sorted(pre_tokenizers.ByteLevel.alphabet())  # a set: sorted, so the byte ids are the same in every process


def word_pieces(texts: Iterable[str], cell_types: Iterable[str], genes: Iterable[str] = ()) -> list[str]:
    """Every piece of ``texts`` split at the delimiters, plus the given genes, the fixed
    phrases and the cell-type names, most frequent first (specials excluded)."""
    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(DELIMITERS), behavior="isolated")
    phrases = [SYSTEM_MSG, MATCH_LINE, *TAGS, *sorted(set(cell_types), key=lambda s: (-len(s), s))]
    tok.add_tokens([AddedToken(p, normalized=False) for p in phrases])
    trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIALS), min_frequency=1, show_progress=False)
    seed = [*DELIMITER_PIECES, "system", "user", "assistant", "Context", *(f"Cell {k}" for k in range(1, MAX_CELLS + 1))]
    corpus = [*texts, "\n".join(seed), *(f"{g}\n" for g in sorted(set(genes)))]
    tok.train_from_iterator(corpus, trainer=trainer)
    # the trainer orders pieces by frequency but breaks ties differently from process to process, so
    # the order is counted here and ties go alphabetically: the same ids (and initial weights) in every run
    counts = Counter(i for enc in tok.encode_batch(corpus) for i in enc.ids)
    vocab = tok.get_vocab(with_added_tokens=True)
    return sorted((p for p in vocab if p not in SPECIALS), key=lambda p: (-counts[vocab[p]], p))


def _decodes_verbatim(piece: str) -> bool:
    """The byte-level decoder maps a token made only of byte symbols symbol by symbol; that is
    the text itself only for printable ASCII. Other such pieces are left to the byte fallback."""
    return any(c not in BYTES for c in piece) or all(33 <= ord(c) <= 126 for c in piece)


def train_tokenizer(texts: Iterable[str], cell_types: Iterable[str], genes: Iterable[str] = ()):
    """A ``Qwen2Tokenizer`` whose pieces are every piece of ``texts`` plus the given genes;
    cell-type names and fixed phrases are single tokens."""
    from transformers import Qwen2Tokenizer

    base = {t: i for i, t in enumerate(SPECIALS)}
    for b in BYTES:
        base.setdefault(b, len(base))
    tok = Qwen2Tokenizer(vocab=base, merges=[], unk_token=UNK, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                         model_max_length=4096, padding_side="left")
    pieces = [p for p in word_pieces(texts, cell_types, genes) if p not in base and _decodes_verbatim(p)]
    tok.add_tokens([AddedToken(p, normalized=False, special=False) for p in pieces])
    tok.chat_template = CHAT_TEMPLATE
    return tok

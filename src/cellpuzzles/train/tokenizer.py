"""A word-level tokenizer for the tiny default model, trained offline on the puzzle corpus.

Pieces are the puzzle format's own units: each gene symbol, each cell-type name, "Cell k",
the delimiters (", ", " | ", ": ", "\\n", ...), and whole fixed phrases (the system
message, the match line) as single tokens. Decoding concatenates pieces, so
``decode(encode(text)) == text`` for any text made of known pieces: completions decode
exactly for the reward. The chat template is ChatML.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from cellpuzzles.task.puzzle import MATCH_LINE, SYSTEM_MSG

PAD, UNK, BOS, EOS = "<|pad|>", "<|unk|>", "<|im_start|>", "<|im_end|>"
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


def train_tokenizer(texts: Iterable[str], cell_types: Iterable[str], genes: Iterable[str] = ()):
    """A ``PreTrainedTokenizerFast`` whose vocabulary is every piece of ``texts`` plus the
    given genes; cell-type names and fixed phrases are single tokens."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(DELIMITERS), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (PAD, UNK, BOS, EOS)])
    phrases = [SYSTEM_MSG, MATCH_LINE, *TAGS, *sorted(set(cell_types), key=lambda s: (-len(s), s))]
    tok.add_tokens([AddedToken(p, normalized=False) for p in phrases])
    trainer = trainers.WordLevelTrainer(special_tokens=[PAD, UNK, BOS, EOS], min_frequency=1, show_progress=False)
    seed = [*DELIMITER_PIECES, "system", "user", "assistant", "Context", *(f"Cell {k}" for k in range(1, MAX_CELLS + 1))]
    tok.train_from_iterator([*texts, "\n".join(seed), *(f"{g}\n" for g in genes)], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, unk_token=UNK, bos_token=BOS, eos_token=EOS,
        model_max_length=4096, padding_side="left",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast

"""The production-shaped test model, built offline: what a user brings, in miniature.

Like Qwen2.5-7B-Instruct: a byte-level BPE tokenizer (Qwen2's pre-tokenizer regex, NFC,
ByteLevel) saved as ``Qwen2Tokenizer`` so plain ``AutoTokenizer`` loads it, Qwen2.5-Instruct's
chat template verbatim (TRL ships it), ``<|endoftext|>`` / ``<|im_start|>`` / ``<|im_end|>`` with
eos and pad set as Qwen sets them, a generation_config like Qwen's (sampling, repetition
penalty, top_k), and a small random-init ``Qwen2ForCausalLM`` (or a Llama-shaped one). The
vocabulary is a few thousand pieces learnt from puzzle text plus general English text, so gene
and cell-type names split into several tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
VOCAB_SIZE = 3000
# a small model: seconds per training step on one CPU thread
SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)
# Qwen2.5-7B-Instruct's generation_config.json (token ids mapped to this vocabulary)
QWEN_GENERATION = dict(do_sample=True, repetition_penalty=1.05, temperature=0.7, top_p=0.8, top_k=20)


def _general_text() -> list[str]:
    """Plain English (the standard library's module documentation), so the BPE vocabulary is
    not the puzzle corpus alone."""
    import importlib

    out = []
    for name in ("argparse", "collections", "json", "logging", "pathlib", "subprocess", "typing", "email",
                 "http.server", "unittest", "decimal", "datetime", "asyncio", "statistics", "textwrap"):
        mod = importlib.import_module(name)
        out.append(mod.__doc__ or "")
        out += [getattr(mod, a).__doc__ or "" for a in sorted(dir(mod)) if not a.startswith("_")
                and isinstance(getattr(mod, a, None), type)]
    return [t for t in out if isinstance(t, str) and t]


def qwen_chat_template() -> str:
    """Qwen2.5-Instruct's chat template, verbatim, as TRL ships it."""
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / "qwen2_5.jinja").read_text()


def build_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE):
    """A byte-level BPE trained on ``texts`` + general text, wrapped as Qwen2Tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[ENDOFTEXT, IM_START, IM_END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([*texts, *_general_text()], trainer=trainer)
    state = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    qwen = Qwen2Tokenizer(vocab=state["vocab"], merges=merges, unk_token=None, bos_token=None,
                          eos_token=IM_END, pad_token=ENDOFTEXT, model_max_length=32768,
                          additional_special_tokens=[IM_START, IM_END])
    qwen.chat_template = qwen_chat_template()
    return qwen


def build_production_model(puzzles: list, traces: list[str], out: Path, arch: str = "qwen2",
                           genes_per_cell: int | None = None, vocab_size: int = VOCAB_SIZE, seed: int = 0) -> Path:
    """An untrained production-shaped model folder whose tokenizer learnt ``puzzles`` and
    ``traces`` (as the pipeline would see them); ``arch`` is ``qwen2`` or ``llama``."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from cellpuzzles.inference.folder import PromptOptions, save
    from cellpuzzles.task.puzzle import format_completion

    prompt = PromptOptions(genes_per_cell=genes_per_cell)
    shown = [prompt.apply(p) for p in puzzles]
    texts = [f"{p.user_msg}\n{t}" for p, t in zip(shown, traces)] + [format_completion("", p.answer) for p in shown]
    tok = build_tokenizer(texts, vocab_size)
    eos, pad = tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(ENDOFTEXT)
    config_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if arch == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    cfg = config_cls(vocab_size=len(tok), max_position_embeddings=4096, tie_word_embeddings=arch == "qwen2",
                     bos_token_id=pad, eos_token_id=eos, pad_token_id=pad, **SHAPE)
    torch.manual_seed(seed)
    model = model_cls(cfg)
    model.generation_config = GenerationConfig(bos_token_id=pad, pad_token_id=pad, eos_token_id=[eos, pad],
                                               **QWEN_GENERATION)
    return save(model, tok, out, prompt)


def names_split(folder: Path, names: list[str]) -> dict[str, int]:
    """How many tokens each name takes after ' -> ' in this folder's tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return {n: len(tok(" " + n, add_special_tokens=False)["input_ids"]) for n in names}

"""Model folders: load and save any Hugging Face causal-LM folder. Nothing downloads.

A model folder is a plain ``save_pretrained`` folder (weights, config, tokenizer, chat
template) plus ``cellpuzzles.json``, the prompt options every consumer (SFT, RL,
evaluation, serving) must apply the same way.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from cellpuzzles.core.errors import CellPuzzlesError, short_reason
from cellpuzzles.task.puzzle import Puzzle

PROMPT_FILE = "cellpuzzles.json"
TINY, PRETRAINED = "tiny", "pretrained"  # model kinds: the built-in default, or any Hugging Face folder


@dataclass
class PromptOptions:
    """How puzzles become prompts for this model."""

    genes_per_cell: int | None = None  # None: every gene the puzzle lists
    restated_genes: int | None = None  # set when the SFT traces were scaffolds (cellpuzzles.task.scaffold)
    tokens_per_cell: float | None = None  # longest SFT trace per cell, in this tokenizer (inference.budget)
    kind: str = PRETRAINED  # TINY for the built-in default: decides the training defaults (train.presets)
    cell_types: list[str] | None = None  # the candidate types it was trained on (serving flags others); None: unknown

    def apply(self, puzzle: Puzzle) -> Puzzle:
        if self.genes_per_cell is None:
            return puzzle
        k = self.genes_per_cell
        return Puzzle(genes=[g[:k] for g in puzzle.genes], candidates=puzzle.candidates, answer=puzzle.answer,
                      context=puzzle.context, puzzle_id=puzzle.puzzle_id, donor_id=puzzle.donor_id,
                      cell_ids=puzzle.cell_ids)


def save(model, tokenizer, out_dir: str | os.PathLike, prompt: PromptOptions) -> Path:
    """Write a complete model folder atomically (temp folder, then rename)."""
    import shutil
    import tempfile

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    model.config.use_cache = True  # training switches the cache off; inference wants it
    for key in ("local_files_only",):  # loader arguments some trainers leave in the config
        model.config.__dict__.pop(key, None)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / PROMPT_FILE).write_text(json.dumps(asdict(prompt), indent=2))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def check_folder(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise CellPuzzlesError(f"--model {p}: not a folder; pass 'tiny' or a Hugging Face model folder with its weights")
    if not (p / "config.json").is_file():
        raise CellPuzzlesError(f"--model {p}: no config.json; pass a Hugging Face model folder (save_pretrained output)")
    if not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise CellPuzzlesError(f"--model {p}: no tokenizer files; save the tokenizer into the model folder")
    return p


def load_tokenizer(path: str | os.PathLike):
    """The folder's tokenizer exactly as plain ``AutoTokenizer`` (vLLM, KServe, TRL) loads it."""
    from transformers import AutoTokenizer

    p = check_folder(path)
    try:
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError) as e:
        raise CellPuzzlesError(f"--model {p}: tokenizer does not load ({short_reason(e)})") from None
    cfg_file = p / "tokenizer_config.json"
    declared = json.loads(cfg_file.read_text()).get("tokenizer_class") if cfg_file.is_file() else None
    if declared in ("TokenizersBackend", "PreTrainedTokenizerFast") and type(tok).__name__ != declared:
        # a tiny-model folder written before its tokenizer was saved as the config's own class:
        # AutoTokenizer rebuilds it as another class that tokenizes differently, so load the saved
        # tokenizer.json as it is (this loader still serves the folder; other tools need a retrained one)
        from transformers import PreTrainedTokenizerFast

        logging.getLogger(__name__).warning(
            "--model %s: an older tiny-model folder (tokenizer saved as %s): loaded as saved; vLLM and plain "
            "AutoTokenizer cannot load it correctly until it is retrained with this version", p, declared)
        tok = PreTrainedTokenizerFast.from_pretrained(str(p), local_files_only=True)
    if not tok.chat_template:
        raise CellPuzzlesError(f"--model {p}: the tokenizer has no chat template; use an instruct/chat model or add one")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_prompt_options(path: str | os.PathLike) -> PromptOptions:
    f = Path(path) / PROMPT_FILE
    if not f.is_file():
        return PromptOptions()
    try:
        saved = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CellPuzzlesError(f"{f}: not JSON ({e.msg}); rewrite it or delete it to use the defaults") from None
    known = {k.name for k in fields(PromptOptions)}
    return PromptOptions(**{k: v for k, v in saved.items() if k in known})


def load_model(path: str | os.PathLike, dtype: str = "auto"):
    """(model, tokenizer, prompt options) from a model folder; clear errors for broken folders."""
    import torch
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(path)
    torch_dtype = {"auto": "auto", "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise CellPuzzlesError(f"--model {path}: weights do not load ({short_reason(e)}); re-export the folder") from None
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok, load_prompt_options(path)

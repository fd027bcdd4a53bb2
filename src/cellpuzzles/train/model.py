"""Model factory: the tiny default (a small Qwen2 built from a config, with a tokenizer
trained on the puzzle corpus) or any Hugging Face causal-LM folder. Nothing downloads.

A model folder is a plain ``save_pretrained`` folder (weights, config, tokenizer, chat
template) plus ``cellpuzzles.json``, the prompt options every consumer (SFT, RL,
evaluation, serving) must apply the same way.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import CellPuzzlesError
from ..puzzle import Puzzle, format_completion

PROMPT_FILE = "cellpuzzles.json"


@dataclass
class TinyConfig:
    """Size of the tiny default model (Qwen2 architecture)."""

    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 384
    max_position_embeddings: int = 2048
    marker_init: bool = True  # initialise gene/type embeddings from the training split's marker statistics
    seed: int = 0


@dataclass
class PromptOptions:
    """How puzzles become prompts for this model."""

    genes_per_cell: int | None = None  # None: every gene the puzzle lists
    restated_genes: int | None = None  # set when the SFT traces were scaffolds (cellpuzzles.scaffold)

    def apply(self, puzzle: Puzzle) -> Puzzle:
        if self.genes_per_cell is None:
            return puzzle
        k = self.genes_per_cell
        return Puzzle(genes=[g[:k] for g in puzzle.genes], candidates=puzzle.candidates, answer=puzzle.answer,
                      context=puzzle.context, puzzle_id=puzzle.puzzle_id, donor_id=puzzle.donor_id,
                      cell_ids=puzzle.cell_ids)


def build_tiny(puzzles: list[Puzzle], traces: list[str], out_dir: str | os.PathLike,
               config: TinyConfig | None = None, prompt: PromptOptions | None = None) -> Path:
    """Train the tokenizer on the corpus, build a randomly initialised model, save both."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from .tokenizer import train_tokenizer

    cfg = config or TinyConfig()
    prompt = prompt or PromptOptions()
    shown = [prompt.apply(p) for p in puzzles]
    texts = [f"{p.user_msg}\n{t}" for p, t in zip(shown, traces)]
    texts += [format_completion("", p.answer) for p in shown]
    tok = train_tokenizer(texts, {t for p in shown for t in p.candidates}, {g for p in shown for gs in p.genes for g in gs})
    torch.manual_seed(cfg.seed)
    mcfg = Qwen2Config(
        vocab_size=len(tok), hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, use_cache=True,
    )
    model = Qwen2ForCausalLM(mcfg)
    if cfg.marker_init:
        marker_init(model, tok, shown)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return save(model, tok, out_dir, prompt)


def marker_init(model, tok, puzzles: list[Puzzle], norm: float = 0.5) -> None:
    """Put the training split's marker evidence into the embeddings: with W the
    types x genes log-odds of a gene being in a type's top genes (centred over types) and
    W ~= U S V^T, type tokens start at U sqrt(S) and gene tokens at V sqrt(S) in the first
    r dimensions, so a hidden state that averages a cell's gene embeddings already scores
    the candidate types (tied embeddings). Attention to the right cell then pays off from
    the first step, instead of waiting for gene->type associations learned from scratch."""
    import numpy as np
    import torch

    from ..solvers import MarkerSolver

    solver = MarkerSolver().fit(puzzles)
    w = solver.log_p - solver.log_q
    w = w - w.mean(0, keepdims=True)
    u, sv, vt = np.linalg.svd(w, full_matrices=False)
    emb = model.get_input_embeddings().weight
    r = min(len(sv), emb.shape[1] // 2)
    root = np.sqrt(sv[:r])
    types, genes = u[:, :r] * root, vt[:r].T * root
    scale = norm / max(np.linalg.norm(np.vstack([types, genes]), axis=1).mean(), 1e-8)
    vocab = tok.get_vocab()
    type_names = {t.strip().lower(): t for p in puzzles for t in p.candidates}
    with torch.no_grad():
        for i, t in enumerate(solver.types):
            tid = vocab.get(type_names.get(t, t))
            if tid is not None:
                emb[tid, :r] = torch.tensor(types[i] * scale, dtype=emb.dtype)
        for g, j in solver.genes.items():
            gid = vocab.get(g)
            if gid is not None:
                emb[gid, :r] = torch.tensor(genes[j] * scale, dtype=emb.dtype)


def save(model, tokenizer, out_dir: str | os.PathLike, prompt: PromptOptions) -> Path:
    """Write a complete model folder atomically (temp folder, then rename)."""
    import shutil
    import tempfile

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
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
    from transformers import AutoTokenizer

    p = check_folder(path)
    cfg_file = p / "tokenizer_config.json"
    declared = json.loads(cfg_file.read_text()).get("tokenizer_class") if cfg_file.is_file() else None
    # a tokenizer saved as the generic backend (the tiny model's word-level one) must load as
    # exactly that; AutoTokenizer would rebuild it as the model type's own class (qwen2 BPE)
    loader = AutoTokenizer
    if declared in ("TokenizersBackend", "PreTrainedTokenizerFast") and (p / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast as loader
    try:
        tok = loader.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError) as e:
        raise CellPuzzlesError(f"--model {p}: tokenizer does not load ({str(e).splitlines()[0][:120]})") from None
    if not tok.chat_template:
        raise CellPuzzlesError(f"--model {p}: the tokenizer has no chat template; use an instruct/chat model or add one")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_prompt_options(path: str | os.PathLike) -> PromptOptions:
    f = Path(path) / PROMPT_FILE
    return PromptOptions(**json.loads(f.read_text())) if f.is_file() else PromptOptions()


def load_model(path: str | os.PathLike, dtype: str = "auto"):
    """(model, tokenizer, prompt options) from a model folder; clear errors for broken folders."""
    import torch
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(path)
    torch_dtype = {"auto": "auto", "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise CellPuzzlesError(f"--model {path}: weights do not load ({str(e).splitlines()[0][:120]}); re-export the folder") from None
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok, load_prompt_options(path)


def lora(model, r: int = 16, alpha: int = 32, dropout: float = 0.05):
    """Wrap a model with LoRA adapters on every linear layer (PEFT)."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                            target_modules="all-linear", task_type="CAUSAL_LM"))

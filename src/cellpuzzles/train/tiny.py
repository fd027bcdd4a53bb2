"""The tiny default model: a small Qwen2 built from a config, with a word-level tokenizer
trained on the puzzle corpus and embeddings initialised from the training split's markers."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from cellpuzzles.inference.folder import TINY, PromptOptions, save
from cellpuzzles.task.puzzle import Puzzle, format_completion


@dataclass
class TinyConfig:
    """Size of the tiny default model (Qwen2 architecture)."""

    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 384
    max_position_embeddings: int = 2048
    marker_init: bool = True  # initialise gene/type embeddings from the training split's marker statistics
    marker_norm: float = 0.5  # mean norm of the marker-initialised embedding rows (marker_init)
    attention_dropout: float = 0.0  # dropout on attention weights while training (measured: docs/results.md)
    seed: int = 0


def build_tiny(puzzles: list[Puzzle], traces: list[str], out_dir: str | os.PathLike,
               config: TinyConfig | None = None, prompt: PromptOptions | None = None) -> Path:
    """Train the tokenizer on the corpus, build a randomly initialised model, save both."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from cellpuzzles.train.tokenizer import train_tokenizer

    cfg = config or TinyConfig()
    prompt = replace(prompt or PromptOptions(), kind=TINY, cell_types=sorted({c for p in puzzles for c in p.candidates}))
    shown = [prompt.apply(p) for p in puzzles]
    texts = [f"{p.user_msg}\n{t}" for p, t in zip(shown, traces)]
    texts += [format_completion("", p.answer) for p in shown]
    tok = train_tokenizer(texts, {t for p in shown for t in p.candidates}, {g for p in shown for gs in p.genes for g in gs})
    torch.manual_seed(cfg.seed)
    mcfg = Qwen2Config(
        vocab_size=len(tok), hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.max_position_embeddings,
        attention_dropout=cfg.attention_dropout, tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, use_cache=True,
    )
    model = Qwen2ForCausalLM(mcfg)
    if cfg.marker_init:
        marker_init(model, tok, shown, cfg.marker_norm)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return save(model, tok, out_dir, prompt)


def marker_init(model, tok, puzzles: list[Puzzle], norm: float) -> None:
    """Put the training split's marker evidence into the embeddings: with W the
    types x genes log-odds of a gene being in a type's top genes (centred over types) and
    W ~= U S V^T, type tokens start at U sqrt(S) and gene tokens at V sqrt(S) in the first
    r dimensions (rows scaled to mean norm ``norm``), so a hidden state that averages a
    cell's gene embeddings already scores the candidate types (tied embeddings). Attention to the right cell then pays off from
    the first step, instead of waiting for gene->type associations learned from scratch."""
    import numpy as np
    import torch

    from cellpuzzles.task.solvers import MarkerSolver

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

"""Supervised fine-tuning on distilled traces with TRL's SFTTrainer.

Records become prompt-completion conversations (system + user -> assistant trace), so
the loss covers the completion only, whatever the model's chat template. LoRA (PEFT) is
the default for a pretrained Hugging Face model, full training for the tiny one; every
kind-dependent default is in ``cellpuzzles.train.presets``. On GPUs: bf16, and a
DeepSpeed ZeRO config shipped in ``cellpuzzles/train/deepspeed/`` via ``deepspeed``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from cellpuzzles.core.errors import CellPuzzlesError
from cellpuzzles.core.options import option
from cellpuzzles.inference.budget import tokens_per_cell
from cellpuzzles.inference.folder import PromptOptions, load_model, save
from cellpuzzles.task.puzzle import Puzzle
from cellpuzzles.task.scaffold import restated_genes
from cellpuzzles.train.checkpoints import latest_checkpoint
from cellpuzzles.train.lora import lora
from cellpuzzles.train.presets import sft_for

DEEPSPEED_DIR = Path(__file__).parent / "deepspeed"


@dataclass
class SFTOptions:
    # steps, rate and batch tuned for the tiny default (measured: docs/results.md)
    # None: the model kind's value (train/presets.py: tiny's tuned values, Cell-o1's for a pretrained model)
    max_steps: int | None = option(None, "optimizer steps; -1: one epoch (default: tiny 900, pretrained one epoch)",
                                   flag="--steps")
    learning_rate: float | None = option(None, "peak learning rate (default: tiny 1e-3, pretrained 5e-5)", flag="--lr")
    batch_size: int | None = option(None, "sequences per step per device (default: tiny 16, pretrained 6)")
    grad_accum: int | None = option(None, "gradient accumulation steps (default: tiny 1, pretrained 16)")
    warmup_ratio: float = 0.05
    lr_scheduler: str = "cosine"
    weight_decay: float = 0.0
    use_lora: bool | None = option(None, "LoRA adapters on every linear layer (default: on for a pretrained model, "
                                   "full training for tiny)", flag="--lora")
    lora_r: int | None = option(None, "LoRA rank, alpha 2r (default: tiny 16, pretrained 256)")
    eval_fraction: float = 0.05
    eval_steps: int = 100
    save_steps: int = 100
    logging_steps: int = 10
    group_by_length: bool = True  # batches of similar length: fewer padded tokens (measured: docs/training.md)
    packing: bool = False  # pack examples into max_length rows (padding-free; wants flash attention on GPUs)
    max_length: int | None = None  # truncate/pack to this many tokens (default: tiny none, pretrained 4096)
    use_liger: bool = False  # Liger fused kernels (rope, rms_norm, swiglu, fused linear cross-entropy)
    gradient_checkpointing: bool = False
    resume: bool = True  # continue from the newest checkpoint in the output folder
    deepspeed: str | None = option(None, "DeepSpeed config on GPUs: zero2, zero3 or a JSON path")
    bf16: bool | None = None  # None: on when CUDA has bf16
    seed: int = option(0, "random seed")


def conversations(pairs: list[tuple[Puzzle, str]], prompt: PromptOptions) -> list[dict]:
    rows = []
    for p, trace in pairs:
        shown = prompt.apply(p)
        rows.append({"prompt": shown.messages(), "completion": [{"role": "assistant", "content": trace}]})
    return rows


def deepspeed_config(name: str | None) -> str | None:
    if name is None:
        return None
    if name in ("zero2", "zero3"):
        return str(DEEPSPEED_DIR / f"{name}.json")
    if not Path(name).is_file():
        raise CellPuzzlesError(f"--deepspeed {name}: not 'zero2', 'zero3' or a JSON file")
    return name


def sft(pairs: list[tuple[Puzzle, str]], model_path: str | os.PathLike, out: str | os.PathLike,
        opt: SFTOptions | None = None, callbacks=()) -> Path:
    """Train on (puzzle, trace) pairs starting from ``model_path``; write the model folder
    ``out`` (checkpoints under ``out``.ckpt, resumable). Returns ``out``."""
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, tok, prompt = load_model(model_path)
    opt = sft_for(opt or SFTOptions(), prompt.kind)
    shown = [(prompt.apply(p), t) for p, t in pairs]
    # a model trained on scaffold traces is decoded with the scaffold (cellpuzzles.task.scaffold);
    # free decoding's token budget follows the longest trace per cell in this tokenizer
    prompt = replace(prompt, restated_genes=restated_genes(shown), tokens_per_cell=tokens_per_cell(tok, shown),
                     cell_types=sorted({*(prompt.cell_types or ()), *(c for p, _ in pairs for c in p.candidates)}))
    use_lora = opt.use_lora
    if use_lora:
        model = lora(model, r=opt.lora_r, alpha=2 * opt.lora_r, seed=opt.seed)
    rows = conversations(pairs, prompt)
    ds = Dataset.from_list(rows).shuffle(seed=opt.seed)
    n_eval = int(len(ds) * opt.eval_fraction) if len(ds) >= 40 else 0
    split = ds.train_test_split(test_size=n_eval, seed=opt.seed) if n_eval else {"train": ds, "test": None}
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported() if opt.bf16 is None else opt.bf16
    ckpt = Path(f"{out}.ckpt")
    total = opt.max_steps if opt.max_steps > 0 else -(-len(split["train"]) // (opt.batch_size * opt.grad_accum))
    cfg = SFTConfig(
        output_dir=str(ckpt),
        max_steps=opt.max_steps,
        num_train_epochs=1,  # used when max_steps is -1 (one epoch)
        learning_rate=opt.learning_rate,
        per_device_train_batch_size=opt.batch_size,
        per_device_eval_batch_size=opt.batch_size,
        gradient_accumulation_steps=opt.grad_accum,
        warmup_steps=max(1, int(opt.warmup_ratio * total)),
        lr_scheduler_type=opt.lr_scheduler,
        weight_decay=opt.weight_decay,
        logging_steps=max(1, min(opt.logging_steps, total // 4)),  # short runs still log a curve
        eval_strategy="steps" if n_eval else "no",
        eval_steps=opt.eval_steps,
        save_strategy="steps",
        save_steps=opt.save_steps,
        save_total_limit=2,
        bf16=bf16,
        max_length=opt.max_length,
        packing=opt.packing,
        padding_free=opt.packing,
        use_liger_kernel=opt.use_liger,
        gradient_checkpointing=opt.gradient_checkpointing,
        report_to=[],
        seed=opt.seed,
        data_seed=opt.seed,
        deepspeed=deepspeed_config(opt.deepspeed),
        disable_tqdm=not os.isatty(2),
        dataloader_num_workers=0,
        train_sampling_strategy="group_by_length" if opt.group_by_length and not opt.packing else "random",
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=split["train"], eval_dataset=split["test"],
                         processing_class=tok, callbacks=list(callbacks))
    start = latest_checkpoint(ckpt) if opt.resume else None
    trainer.train(resume_from_checkpoint=str(start[0]) if start else None)
    final = trainer.model
    if use_lora:
        final = final.merge_and_unload()
    return save(final, tok, out, prompt)

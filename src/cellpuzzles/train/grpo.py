"""GRPO with the batch-level reward, through TRL's GRPOTrainer (as in the Cell-o1 repo)."""

from __future__ import annotations

import os
from pathlib import Path

from cellpuzzles.core.errors import CellPuzzlesError
from cellpuzzles.inference.folder import load_model, save
from cellpuzzles.task.puzzle import Puzzle
from cellpuzzles.train.callbacks import MetricsLogger, ValidationAccuracy
from cellpuzzles.train.checkpoints import latest_checkpoint
from cellpuzzles.train.lora import lora
from cellpuzzles.train.presets import rl_for
from cellpuzzles.train.rl_common import (
    RLOptions,
    cellpuzzles_reward,
    completion_budget,
    format_ok,
    resolve_rollout,
    rl_rows,
    trainer_args,
)
from cellpuzzles.train.scaffold_rollout import scaffold_rollout


def train_grpo(train: list[Puzzle], val: list[Puzzle], model_path: str | os.PathLike, out: str | os.PathLike,
               opt: RLOptions, logger: MetricsLogger | None = None) -> Path:
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    if opt.rollout == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise CellPuzzlesError("--rollout vllm needs the vllm package (the GPU training image has it); "
                                   "use --rollout hf") from None
    model, tok, prompt = load_model(model_path)
    opt = rl_for(opt, prompt.kind)  # unset options: the model kind's defaults (train/presets.py)
    rollout = resolve_rollout(opt.rollout, prompt)
    use_lora = opt.use_lora  # resolved per model kind by train_rl (train/presets.py)
    if use_lora:
        model = lora(model, r=opt.lora_r, alpha=2 * opt.lora_r, seed=opt.seed)
    ds = Dataset.from_list(rl_rows(train, prompt)).shuffle(seed=opt.seed)
    logger = logger or MetricsLogger("rl")
    shown_val = [prompt.apply(p) for p in val[: opt.val_size]]
    rollout_func = None
    if rollout == "scaffold":
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is experimental in TRL
        rollout_func = scaffold_rollout(tok, [prompt.apply(p) for p in train], prompt.restated_genes,
                                        opt.temperature, opt.seed)
    ckpt = Path(f"{out}.ckpt")
    cfg = GRPOConfig(
        **trainer_args(opt, str(ckpt)),
        max_steps=opt.max_steps,
        per_device_train_batch_size=opt.prompts_per_step * opt.num_generations,
        num_generations=opt.num_generations,
        beta=opt.beta,
        max_completion_length=completion_budget(train, opt, tok, prompt),
        reward_weights=[1.0, 0.0],  # the reward, and the format ratio (logged only)
        use_vllm=rollout == "vllm",
        vllm_mode="colocate",
        cache_implementation="static" if opt.static_cache else None,
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        log_completions=False,
    )
    # beta > 0 rebuilds the reference model from config._name_or_path: the model is loaded
    # from a saved folder, so that path is the starting policy (FACTS: GRPO/RLOO reference)
    trainer = GRPOTrainer(
        model=model, reward_funcs=[cellpuzzles_reward, format_ok], args=cfg, train_dataset=ds,
        processing_class=tok, rollout_func=rollout_func,
        callbacks=[logger, ValidationAccuracy(shown_val, tok, logger, every=opt.eval_steps,
                                              restated_genes=prompt.restated_genes,
                                              tokens_per_cell=prompt.tokens_per_cell)],
    )
    start = latest_checkpoint(ckpt) if opt.resume else None
    trainer.train(resume_from_checkpoint=str(start[0]) if start else None)
    final = trainer.model.merge_and_unload() if use_lora else trainer.model
    return save(final, tok, out, prompt)

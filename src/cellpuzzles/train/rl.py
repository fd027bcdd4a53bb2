"""RL entry point: GRPO or PPO on the batch-level reward."""

from __future__ import annotations

import os
from pathlib import Path

from cellpuzzles.core.errors import CellPuzzlesError
from cellpuzzles.task.puzzle import Puzzle
from cellpuzzles.train.callbacks import MetricsLogger
from cellpuzzles.train.rl_common import RLOptions


def train_rl(train: list[Puzzle], val: list[Puzzle], model_path: str | os.PathLike, out: str | os.PathLike,
             opt: RLOptions, logger: MetricsLogger | None = None) -> Path:
    """RL from the model folder ``model_path``; options left unset take the model kind's and
    algorithm's defaults (train/presets.py)."""
    from cellpuzzles.inference.folder import load_prompt_options
    from cellpuzzles.train.presets import rl_for

    if opt.algo not in ("grpo", "ppo"):
        raise CellPuzzlesError(f"--algo {opt.algo!r}: choose grpo or ppo")
    opt = rl_for(opt, load_prompt_options(model_path).kind)
    if opt.algo == "grpo":
        from cellpuzzles.train.grpo import train_grpo

        return train_grpo(train, val, model_path, out, opt, logger)
    if opt.algo == "ppo":
        from cellpuzzles.train.ppo import train_ppo

        return train_ppo(train, val, model_path, out, opt, logger)
    raise CellPuzzlesError(f"--algo {opt.algo!r}: choose grpo or ppo")

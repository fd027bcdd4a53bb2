"""What GRPO and PPO share: options, the reward functions, datasets."""

from __future__ import annotations

from dataclasses import dataclass

from cellpuzzles.core.options import option
from cellpuzzles.inference.folder import PromptOptions
from cellpuzzles.task.puzzle import Puzzle, is_well_formed
from cellpuzzles.task.reward import batch_reward


@dataclass
class RLOptions:
    algo: str = option("grpo", "grpo (TRL GRPOTrainer) or ppo (TRL experimental PPOTrainer)", choices=("grpo", "ppo"))
    # None: the model kind's and algorithm's value (train/presets.py)
    max_steps: int | None = option(None, "RL steps (default: tiny 40, pretrained 200)", flag="--steps")
    learning_rate: float | None = option(None, "learning rate (default: tiny grpo 5e-4 / ppo 1e-3, pretrained 1e-6)",
                                         flag="--lr")
    prompts_per_step: int | None = option(None, "prompts per step (default: tiny grpo 8 / ppo 32, pretrained 64)")
    num_generations: int | None = option(None, "GRPO group size, rollouts per prompt (default: tiny 4, pretrained 5)")
    beta: float | None = option(None, "KL coefficient to the reference policy (default: tiny grpo 0.001 / ppo 0.01, "
                                      "pretrained 0.001)")
    temperature: float = 1.0
    max_completion_length: int | None = None  # None: from the model's tokenizer and traces (inference.budget)
    val_size: int = option(32, "validation puzzles held out from the RL puzzles when no --val is given")
    eval_steps: int = 10
    save_steps: int = 10
    resume: bool = True
    # "auto": "scaffold" for a model trained on scaffold traces, else "hf"; "hf": the model's
    # own generate; "vllm": TRL's vLLM integration; "scaffold": train/scaffold_rollout.py
    rollout: str = option("auto", "auto: scaffold for a model trained on scaffold traces, else hf (the model's generate)",
                          choices=("auto", "hf", "vllm", "scaffold"))
    static_cache: bool = False  # compiled static KV cache for HF rollouts (pays off on GPUs)
    use_lora: bool | None = option(None, "LoRA adapters (default: on for a pretrained model, full training for tiny)",
                                   flag="--lora")
    lora_r: int | None = option(None, "LoRA rank, alpha 2r (default: tiny 16, pretrained 256)")
    seed: int = option(0, "random seed")


ROLLOUTS = ("auto", "hf", "vllm", "scaffold")


def resolve_rollout(rollout: str, prompt: PromptOptions) -> str:
    """The rollout backend to use for this model (``auto`` decided by its prompt options)."""
    from cellpuzzles.core.errors import CellPuzzlesError

    if rollout not in ROLLOUTS:
        raise CellPuzzlesError(f"--rollout {rollout}: use one of {', '.join(ROLLOUTS)}")
    if rollout == "auto":
        return "scaffold" if prompt.restated_genes else "hf"
    if rollout == "scaffold" and not prompt.restated_genes:
        raise CellPuzzlesError("--rollout scaffold needs a model trained on scaffold traces (restated_genes in its "
                               "cellpuzzles.json); use --rollout hf")
    return rollout


def completion_text(c) -> str:
    """TRL passes conversational completions as message lists; plain ones as strings."""
    if isinstance(c, list):
        return c[0]["content"] if c else ""
    return c


def cellpuzzles_reward(completions, answer, **kwargs) -> list[float]:
    """The Cell-o1 batch reward (``cellpuzzles.task.reward.batch_reward``), nothing else."""
    return [batch_reward(completion_text(c), a) for c, a in zip(completions, answer)]


def format_ok(completions, **kwargs) -> list[float]:
    """1.0 when the completion obeys the format rule; logged with weight 0 (format ratio)."""
    return [1.0 if is_well_formed(completion_text(c)) else 0.0 for c in completions]


def rl_rows(puzzles: list[Puzzle], prompt: PromptOptions) -> list[dict]:
    return [{"prompt": prompt.apply(p).messages(), "answer": p.answer_text, "n": p.n} for p in puzzles]


def completion_budget(puzzles: list[Puzzle], opt: RLOptions, tok, prompt: PromptOptions) -> int:
    """New tokens per rollout: the option, else the model's budget for the largest puzzle."""
    from cellpuzzles.inference.budget import new_token_budget

    return opt.max_completion_length or new_token_budget(tok, [prompt.apply(p) for p in puzzles], prompt.tokens_per_cell)


def trainer_args(opt: RLOptions, output_dir: str) -> dict:
    """Trainer arguments GRPO and PPO share: per-step logging, checkpoints, seed, no reporters."""
    import os

    import torch

    return dict(output_dir=output_dir, learning_rate=opt.learning_rate, temperature=opt.temperature,
                logging_steps=1, save_strategy="steps", save_steps=opt.save_steps, save_total_limit=2,
                report_to=[], seed=opt.seed, use_cpu=not torch.cuda.is_available(),
                disable_tqdm=not os.isatty(2))

"""Training defaults per model kind, in one place.

``tiny``: the built-in default's values, tuned on it (measured: docs/results.md,
docs/training.md): full training, high learning rates, many small steps.
``pretrained``: any Hugging Face folder (e.g. Qwen2.5-7B-Instruct): Cell-o1's own settings for
Qwen2.5-7B-Instruct (their sft.sh and run_cello1_grpo.sh): SFT with LoRA r 256, learning rate
5e-5, one epoch, batch 6 x 16 accumulation, 4,096-token sequences; GRPO learning rate 1e-6, KL
0.001, 5 rollouts per prompt, 64 prompts per step. PPO for a pretrained model takes the GRPO
rate and KL (Cell-o1 published no PPO run).

An option left ``None`` takes its kind's value here; a value the user sets always wins.
"""

from __future__ import annotations

from dataclasses import fields, replace

from cellpuzzles.inference.folder import PRETRAINED, TINY

SFT_DEFAULTS = {
    # tiny: lr 1e-3. Measured (benchmarks/sft_learning_rate.py, seed 0, 300 steps): teacher-forced accuracy
    # of the cell type after "->" 0.86 at 1e-3, 0.11 at 2e-3 and 0.10 at 5e-3 (chance: the higher rates wash
    # out the marker-initialised embeddings and the model settles on the format alone)
    TINY: dict(max_steps=900, learning_rate=1e-3, batch_size=16, grad_accum=1, use_lora=False, lora_r=16,
               max_length=None),
    PRETRAINED: dict(max_steps=-1, learning_rate=5e-5, batch_size=6, grad_accum=16, use_lora=True, lora_r=256,
                     max_length=4096),
}
RL_DEFAULTS = {
    TINY: {
        # tuned with scaffold rollouts (PPO: scaffold tokens as the environment's; GAE lambda 1)
        "grpo": dict(max_steps=40, learning_rate=5e-4, beta=0.001, prompts_per_step=8, num_generations=4,
                     use_lora=False, lora_r=16),
        "ppo": dict(max_steps=40, learning_rate=1e-3, beta=0.01, prompts_per_step=32, num_generations=4,
                    use_lora=False, lora_r=16),
    },
    PRETRAINED: {
        "grpo": dict(max_steps=200, learning_rate=1e-6, beta=0.001, prompts_per_step=64, num_generations=5,
                     use_lora=True, lora_r=256),
        "ppo": dict(max_steps=200, learning_rate=1e-6, beta=0.001, prompts_per_step=64, num_generations=5,
                    use_lora=True, lora_r=256),
    },
}
ONE_EPOCH = -1  # SFT max_steps meaning "one pass over the traces"


def _fill(opt, values: dict):
    unset = {f.name for f in fields(opt) if getattr(opt, f.name) is None}
    return replace(opt, **{k: v for k, v in values.items() if k in unset})


def sft_for(opt, kind: str):
    """``opt`` (SFTOptions) with its unset fields taken from the model kind's defaults."""
    return _fill(opt, SFT_DEFAULTS[kind])


def rl_for(opt, kind: str):
    """``opt`` (RLOptions) with its unset fields taken from the model kind's and algorithm's defaults."""
    return _fill(opt, RL_DEFAULTS[kind].get(opt.algo, {}))

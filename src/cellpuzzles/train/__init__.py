"""Training: model factory, tokenizer, SFT, RL (GRPO, PPO)."""

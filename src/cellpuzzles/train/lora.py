"""LoRA adapters (PEFT) for fine-tuning a Hugging Face model."""


def lora(model, r: int = 16, alpha: int = 32, dropout: float = 0.05, seed: int = 0):
    """Wrap a model with LoRA adapters on every linear layer (PEFT). The adapters' random
    initialisation is seeded, so the same seed gives the same run (the trainer seeds only later)."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                            target_modules="all-linear", task_type="CAUSAL_LM"))

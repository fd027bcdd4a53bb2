"""SFT throughput on a GPU: the project's SFT path vs a plain PyTorch loop, same run.

Models are random-initialised at Qwen2.5 shapes (weight values do not change speed), the
data are synthetic 2048-token sequences, bf16, SDPA. Baseline: plain loop, AdamW (fused),
gradient checkpointing, batch 8 x 2048 (as FACTS.md's baseline). Project: `cellpuzzles.
train.sft.sft` with packing + Liger kernels (+ optional checkpointing). Prints tokens/s,
MFU (6N + attention FLOPs over 989 TFLOP/s bf16 dense for H100) and the ratio.

    python benchmarks/sft_gpu.py --shape 0.5b            # on a GPU
    python benchmarks/sft_gpu.py --shape toy --steps 3   # CPU smoke test of the code path

Status: written without a GPU in the session that added it; run it on one before quoting.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

SHAPES = {  # Qwen2.5 configs
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936),
    "toy": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=512),
}
PEAK_FLOPS = 989e12


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=list(SHAPES), default="0.5b")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--checkpointing", action="store_true", help="also checkpoint in the project path")
    a = ap.parse_args()

    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from cellpuzzles.inference.folder import PromptOptions, save
    from cellpuzzles.task.puzzle import make_puzzle
    from cellpuzzles.train.sft import SFTOptions, sft

    gpu = torch.cuda.is_available()
    seq = a.seq if a.shape != "toy" else min(a.seq, 256)
    dev = "cuda" if gpu else "cpu"
    dtype = torch.bfloat16 if gpu else torch.float32
    cfg = Qwen2Config(**SHAPES[a.shape], max_position_embeddings=max(seq, 4096), tie_word_embeddings=True)
    work = Path(tempfile.mkdtemp(prefix="bench-sft-gpu-"))

    # a word-level tokenizer over numbered words so that any text maps to known ids
    vocab = {f"w{i}": i for i in range(cfg.vocab_size - 8)}
    for i, t in enumerate(["<|pad|>", "<|unk|>", "<|im_start|>", "<|im_end|>"]):
        vocab[t] = cfg.vocab_size - 8 + i
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<|pad|>", eos_token="<|im_end|>",
                                  bos_token="<|im_start|>", unk_token="<|unk|>")
    tok.chat_template = ("{% for m in messages %}{{ '<|im_start|> ' + m['role'] + ' ' + m['content'] + ' <|im_end|> ' }}"
                         "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|> assistant ' }}{% endif %}")
    model = Qwen2ForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    save(model, tok, work / "init", PromptOptions())

    g = torch.Generator().manual_seed(0)
    # baseline: plain loop, full sequences of `seq` tokens
    model = Qwen2ForCausalLM.from_pretrained(work / "init", dtype=dtype, attn_implementation="sdpa").to(dev)
    model.gradient_checkpointing_enable()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=gpu)
    ids = torch.randint(0, cfg.vocab_size - 8, (a.batch, seq), generator=g).to(dev)

    def step(model, opt):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step(model, opt)
    if gpu:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step(model, opt)
    if gpu:
        torch.cuda.synchronize()
    base_tps = a.steps * a.batch * seq / (time.perf_counter() - t0)
    del model, opt
    if gpu:
        torch.cuda.empty_cache()

    # project path: records whose completion fills ~seq tokens, packed to seq
    words = lambda n: " ".join(f"w{int(x)}" for x in torch.randint(0, cfg.vocab_size - 8, (n,), generator=g))  # noqa: E731
    pairs = []
    n_rec = (a.steps + 4) * a.batch * 2
    for _ in range(n_rec):
        p = make_puzzle([["w1"], ["w2"], ["w3"]], ["w4", "w5", "w6"], "ctx")
        pairs.append((p, words(seq // 2)))
    t0 = time.perf_counter()
    sft(pairs, work / "init", work / "sft", SFTOptions(
        max_steps=a.steps, batch_size=a.batch, learning_rate=1e-5, packing=True, max_length=seq,
        use_liger=gpu, gradient_checkpointing=a.checkpointing, eval_fraction=0.0, save_steps=10**6,
        logging_steps=a.steps, group_by_length=False, resume=False))
    wall = time.perf_counter() - t0
    proj_tps = a.steps * a.batch * seq / wall  # includes setup: a lower bound

    attn = 6 * cfg.num_hidden_layers * cfg.hidden_size * seq  # causal attention FLOPs per token (fwd+bwd)
    fpt = 6 * n_params + attn
    print(f"shape {a.shape} ({n_params / 1e6:.0f}M params), batch {a.batch} x {seq}, device {dev}")
    print(f"baseline (plain loop, checkpointing): {base_tps:10.0f} tokens/s  MFU {base_tps * fpt / PEAK_FLOPS:.2f}")
    print(f"project  (sft(): packing{' + Liger' if gpu else ''}): {proj_tps:10.0f} tokens/s  "
          f"MFU {proj_tps * fpt / PEAK_FLOPS:.2f}  (lower bound: includes setup)")
    print(f"ratio project/baseline: {proj_tps / base_tps:.2f}x  (target >= 1.5x)")


if __name__ == "__main__":
    main()

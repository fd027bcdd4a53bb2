"""SFT throughput on a GPU: the project's SFT path vs a plain PyTorch loop, same run.

Models are random-initialised at Qwen2.5 shapes (weight values do not change speed), the
data are synthetic, bf16 weights, SDPA attention, full fine-tuning in every variant.

* ``plain_ckpt`` (the baseline, as in FACTS.md): a bare loop over batch 8 x 2048 tokens,
  AdamW (fused), gradient checkpointing, loss over every token.
* ``plain_nockpt``: the same loop without checkpointing (fits on an H200; it ran out of
  memory on an H100 at 1.5B).
* ``project``: ``cellpuzzles.train.sft.sft`` (TRL SFTTrainer) with packing (BFD, padding-free)
  + Liger kernels, no checkpointing, ``use_lora=False`` (the project's default for a
  non-tiny model is LoRA: a different workload), on prompt-completion records of 1.25k-2k
  tokens (a 988-token prompt + completion) packed (BFD) into rows of 2048 tokens. Timed by
  a trainer callback over the steps after the warm-up ones (setup, dataset building and
  the final save excluded); tokens are counted by a forward hook on the model (every token
  of the packed rows).
* ``project_ckpt``: the same with gradient checkpointing.
* ``project_nopack``: the project's default batching instead (no packing: padded batches
  grouped by length, ``SFTOptions.packing=False``), Liger on; padding is not counted.

Every project variant sets ``grad_accum=1`` (the pretrained default is 16) so that an
optimizer step covers the same 8 rows as the plain loop's. Without flash-attn (not on the
GPU image) TRL warns that padding-free packing wants flash attention: transformers then
builds a block-diagonal mask over the flattened batch for SDPA (a dense mask, no causal
fast path), which this benchmark measures as it is.

MFU = tokens/s x (6N + 6 L h s) / 989 TFLOP/s (bf16 dense, H100 and H200), with s the
sequence length for the plain loop and the token-weighted mean packed-segment length for
the project path (causal attention of a packed row only spans each segment).

    python benchmarks/sft_gpu.py --shape 0.5b --json out.json   # on a GPU
    python benchmarks/sft_gpu.py --shape toy --steps 2 --warmup 1 --batch 2 --seq 1100   # CPU smoke test

Status: not yet run on a GPU (the session that prepared benchmarks/gpu_suite.sh, which runs it
at both shapes, was lent none: loans were paused). Its CPU smoke test passes under the GPU
image's versions (transformers 5.17, trl 1.12.0, datasets 5.2.0).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import traceback
from pathlib import Path

SHAPES = {  # Qwen2.5 configs
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936),
    "small": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=16384),
    "toy": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=512),
}
PEAK_FLOPS = 989e12  # bf16 dense, H100 SXM and H200 (datasheet)
N_SPECIAL = 8


SPECIALS = ("<|pad|>", "<|unk|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{%- endif %}"
)


def byte_tokenizer():
    """A byte-level ``Qwen2Tokenizer`` with no merges (ChatML template): one token per
    character of ASCII text. Saved as what the Qwen2 config says, so plain ``AutoTokenizer``
    (and the project's loader) rebuild exactly this tokenizer."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    base = {t: i for i, t in enumerate(SPECIALS)}
    for b in sorted(pre_tokenizers.ByteLevel.alphabet()):
        base.setdefault(b, len(base))
    tok = Qwen2Tokenizer(vocab=base, merges=[], unk_token="<|unk|>", bos_token="<|im_start|>",
                         eos_token="<|im_end|>", pad_token="<|pad|>", model_max_length=1 << 20)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def random_text(n: int, g) -> str:
    """``n`` random lowercase letters: ``n`` tokens under ``byte_tokenizer``."""
    import torch

    return "".join(chr(97 + int(x)) for x in torch.randint(0, 26, (n,), generator=g))


def records(n: int, lo: int, hi: int, g) -> list:
    """``n`` (puzzle, completion) pairs, completions of ``lo``..``hi`` tokens (uniform)."""
    import torch

    from cellpuzzles.task.puzzle import make_puzzle

    p = make_puzzle([["GENEA"], ["GENEB"], ["GENEC"]], ["type a", "type b", "type c"], "ctx")
    lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [(p, random_text(k, g)) for k in lens]


def versions() -> dict:
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "liger-kernel", "triton"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    try:
        import torch

        out["cuda"] = torch.version.cuda
        out["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001
        pass
    return out


class _Meter:
    """Forward pre-hook (tokens, packed-segment lengths) + trainer callback (step times)."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.tokens = 0
        self.seg_sq = 0.0  # sum of segment length squared: attention FLOPs
        self.t0 = self.t1 = None
        self.tokens0 = self.seg_sq0 = 0
        self.steps = 0

    def hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is None and args:
            ids = args[0]
        if ids is None:
            return
        pos = kwargs.get("position_ids")
        mask = kwargs.get("attention_mask")
        if mask is not None:
            n = int(mask.sum())
            lens = mask.sum(-1).tolist()
        else:
            n = ids.numel()
            if pos is not None:
                flat = pos.reshape(-1)
                starts = (flat == 0).nonzero().reshape(-1).tolist() + [flat.numel()]
                lens = [b - a for a, b in zip(starts[:-1], starts[1:])]
                if not starts[:-1] or starts[0] != 0:
                    lens = [flat.numel()]
            else:
                lens = [ids.shape[-1]] * ids.shape[0]
        self.tokens += n
        self.seg_sq += float(sum(x * x for x in lens))

    def callback(self):
        import torch
        from transformers import TrainerCallback

        meter = self

        class CB(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kw):
                model.register_forward_pre_hook(meter.hook, with_kwargs=True)

            def on_step_end(self, args, state, control, **kw):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                if state.global_step == meter.warmup:
                    meter.t0, meter.tokens0, meter.seg_sq0 = time.perf_counter(), meter.tokens, meter.seg_sq
                elif state.global_step > meter.warmup:
                    meter.t1, meter.steps = time.perf_counter(), state.global_step - meter.warmup

        return CB()


def plain(model, ids, steps: int, warmup: int, checkpointing: bool, gpu: bool) -> dict:
    import torch

    if checkpointing:
        model.gradient_checkpointing_enable()
    else:
        model.gradient_checkpointing_disable()
    model.config.use_cache = False
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=gpu)
    losses = []

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup):
        step()
    if gpu:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        losses.append(step())
    if gpu:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"tokens_per_s": steps * ids.numel() / dt, "seconds": dt, "steps": steps,
            "tokens_per_step": ids.numel(), "last_loss": float(losses[-1])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=list(SHAPES), default="0.5b")
    ap.add_argument("--steps", type=int, default=20, help="timed steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--variants", default="plain_ckpt,plain_nockpt,project",
                    help="comma list of plain_ckpt, plain_nockpt, project, project_ckpt, project_nopack")
    ap.add_argument("--liger", choices=("auto", "on", "off"), default="auto", help="auto: on with a GPU")
    ap.add_argument("--json", default=None, help="write the results here")
    a = ap.parse_args()

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    gpu = torch.cuda.is_available()
    seq = a.seq
    dev = "cuda" if gpu else "cpu"
    dtype = torch.bfloat16 if gpu else torch.float32
    liger = gpu if a.liger == "auto" else a.liger == "on"
    cfg = Qwen2Config(**SHAPES[a.shape], max_position_embeddings=max(seq, 4096), tie_word_embeddings=True,
                      attn_implementation="sdpa")
    work = Path(tempfile.mkdtemp(prefix="bench-sft-gpu-"))
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    res = {"benchmark": "sft_gpu", "shape": a.shape, "batch": a.batch, "seq": seq, "device": dev,
           "dtype": str(dtype), "warmup": a.warmup, "steps": a.steps, "versions": versions(), "variants": {}}

    def dump():
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=2))

    torch.manual_seed(0)
    with torch.device(dev):
        model = Qwen2ForCausalLM(cfg)
    model.to(dtype)
    n_params = sum(p.numel() for p in model.parameters())
    res["params"] = n_params
    L, h = cfg.num_hidden_layers, cfg.hidden_size

    def mfu(tps: float, s_eff: float) -> float:
        return tps * (6 * n_params + 6 * L * h * s_eff) / PEAK_FLOPS

    if any(v.startswith("project") for v in variants):
        from cellpuzzles.inference.folder import PromptOptions, save

        save(model, byte_tokenizer(), work / "init", PromptOptions())
    print(f"shape {a.shape} ({n_params / 1e6:.0f}M params), batch {a.batch} x {seq}, device {dev} "
          f"({res['versions'].get('gpu')}), {dtype}", flush=True)

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size - N_SPECIAL, (a.batch, seq), generator=g).to(dev)
    for v in [v for v in variants if v.startswith("plain")]:
        if gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            r = plain(model, ids, a.steps, a.warmup, v == "plain_ckpt", gpu)
            r["mfu"] = mfu(r["tokens_per_s"], seq)
            r["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30 if gpu else None
        except torch.OutOfMemoryError as e:
            r = {"error": f"out of memory: {str(e).splitlines()[0]}"}
        except Exception as e:  # noqa: BLE001
            r = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc(limit=6)}
        res["variants"][v] = r
        dump()
        print(f"{v:14s} {json.dumps({k: x for k, x in r.items() if k != 'trace'})}", flush=True)
    del model
    if gpu:
        torch.cuda.empty_cache()

    for v in [v for v in variants if v.startswith("project")]:
        from cellpuzzles.train.sft import SFTOptions, sft

        # a 988-token prompt (the CellPuzzles system message, one byte-level token per
        # character) + a completion of 1/8..1/2 of a row: records of ~1,250-2,000 tokens, about
        # one per 2048-token row (as real CellPuzzles records, ~1.5-2.5k tokens); BFD packing
        pairs = records((a.warmup + a.steps + 2) * a.batch * 2, seq // 8, seq // 2, g)
        for use_liger in ([liger, False] if liger else [False]):
            if gpu:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            meter = _Meter(a.warmup)
            t0 = time.perf_counter()
            name = v + ("+liger" if use_liger else "")
            try:
                sft(pairs, work / "init", work / f"out-{name}", SFTOptions(
                    max_steps=a.warmup + a.steps, batch_size=a.batch, grad_accum=1, learning_rate=1e-5,
                    packing=v != "project_nopack", group_by_length=v == "project_nopack",
                    max_length=seq, use_liger=use_liger, gradient_checkpointing=v == "project_ckpt",
                    use_lora=False, eval_fraction=0.0, save_steps=10**6, logging_steps=a.warmup + a.steps,
                    resume=False), callbacks=[meter.callback()])
                dt = meter.t1 - meter.t0
                tok = meter.tokens - meter.tokens0
                s_eff = (meter.seg_sq - meter.seg_sq0) / max(tok, 1)
                r = {"tokens_per_s": tok / dt, "seconds": dt, "steps": meter.steps, "tokens_per_step": tok / meter.steps,
                     "mean_segment_tokens_weighted": s_eff, "wall_incl_setup_s": time.perf_counter() - t0,
                     "liger": use_liger}
                r["mfu"] = mfu(r["tokens_per_s"], s_eff)
                r["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30 if gpu else None
                ok = True
            except Exception as e:  # noqa: BLE001
                r = {"error": f"{type(e).__name__}: {str(e)[:500]}", "trace": traceback.format_exc(limit=8),
                     "liger": use_liger}
                ok = False
            res["variants"][name] = r
            dump()
            print(f"{name:14s} {json.dumps({k: x for k, x in r.items() if k != 'trace'})}", flush=True)
            if not ok:
                print(r["trace"], flush=True)
            if ok:
                break  # Liger worked (or was off): no fallback run

    base = res["variants"].get("plain_ckpt", {})
    print("\nsummary (tokens/s, MFU of 989 TFLOP/s, peak GB, ratio to plain_ckpt in this run):")
    for k, r in res["variants"].items():
        if "tokens_per_s" in r:
            ratio = r["tokens_per_s"] / base["tokens_per_s"] if "tokens_per_s" in base else float("nan")
            r["ratio_to_plain_ckpt"] = ratio
            print(f"  {a.shape:5s} {k:22s} {r['tokens_per_s']:10.0f}  MFU {r['mfu']:.2f}  "
                  f"peak {r['peak_gb'] if r['peak_gb'] is None else round(r['peak_gb'], 1)}  {ratio:.2f}x")
        else:
            print(f"  {a.shape:5s} {k:22s} failed: {r['error'][:200]}")
    dump()


if __name__ == "__main__":
    main()

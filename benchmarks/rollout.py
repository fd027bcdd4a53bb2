"""RL rollout throughput: the project's rollout path vs plain Hugging Face generate, same run,
same batch size, same number of completion tokens.

Two comparisons:

* ``--shape 0.5b|1.5b`` (on a GPU; ``toy`` is a CPU smoke test of the code path): a
  random-init model at Qwen2.5 shapes, B prompts of P tokens, T sampled tokens each (EOS
  suppressed so every row generates T). Baseline: ``model.generate`` with the default dynamic
  KV cache. Project: what ``cellpuzzles rl`` rolls out with on this machine: TRL's vLLM engine
  (``--rollout vllm``) when vllm is installed and a GPU is present, else ``generate`` with a
  static, compiled KV cache (``RLOptions.static_cache``, GRPOConfig ``cache_implementation``).
* ``--scaffold MODEL`` (any machine): for a model trained on scaffold traces (the tiny default
  after SFT), the scaffold rollouts GRPO and PPO use for it (``train/scaffold_rollout.py``)
  against plain sampling with ``generate`` of as many completion tokens, on the same prompts.

Prints completion tokens/s for both and the ratio.

    python benchmarks/rollout.py --shape 0.5b                 # on a GPU
    python benchmarks/rollout.py --shape toy --new-tokens 32  # CPU smoke test
    python benchmarks/rollout.py --scaffold runs/default/...  # a scaffold model folder

Status: the GPU comparison has not yet run on a GPU (no session that had one ran it);
``benchmarks/gpu_suite.sh`` runs it at FACTS.md's H100 setting (0.5B shape, batch 64, 512-token
prompts, 256 new tokens, two warm-ups for the compiled path). The GPU image has no vLLM, so
there the project path is the static compiled cache, an opt-in (``RLOptions.static_cache``):
``cellpuzzles rl``'s default HF rollout is the dynamic-cache baseline itself.
"""

from __future__ import annotations

import argparse
import time

from sft_gpu import SHAPES  # Qwen2.5 shapes, shared with the SFT benchmark (same folder)


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn, repeats: int, warmup: int = 1, times: list | None = None) -> float:
    """Seconds per call, best of ``repeats`` after ``warmup`` full-length calls (compilation,
    allocation: under-warmed calls read up to 3x slower). Every timed call is appended to ``times``."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        _sync()
        t = time.perf_counter()
        fn()
        _sync()
        dt = time.perf_counter() - t
        best = min(best, dt)
        if times is not None:
            times.append(dt)
    return best


def generate_fn(model, ids, new_tokens: int, **kwargs):
    import torch

    def run():
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                 temperature=1.0, top_k=0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 pad_token_id=0, **kwargs)
        assert out.shape[1] == ids.shape[1] + new_tokens
    return run


def vllm_fn(folder: str, ids, new_tokens: int):
    from vllm import LLM, SamplingParams

    llm = LLM(model=folder, skip_tokenizer_init=True, gpu_memory_utilization=0.5, dtype="bfloat16")
    params = SamplingParams(temperature=1.0, max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True)
    prompts = [{"prompt_token_ids": row} for row in ids.tolist()]
    return lambda: llm.generate(prompts, params, use_tqdm=False)


def shapes(a) -> None:
    import json
    import tempfile
    from pathlib import Path

    import torch
    from sft_gpu import versions
    from transformers import Qwen2Config, Qwen2ForCausalLM

    gpu = torch.cuda.is_available()
    dev, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    cfg = Qwen2Config(**SHAPES[a.shape], max_position_embeddings=4096, tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device(dev):
        model = Qwen2ForCausalLM(cfg)
    model = model.to(dtype).eval()
    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.prompt_tokens), device=dev)
    tokens = a.batch * a.new_tokens
    res = {"benchmark": "rollout", "shape": a.shape, "batch": a.batch, "prompt_tokens": a.prompt_tokens,
           "new_tokens": a.new_tokens, "repeats": a.repeats, "warmup": a.warmup, "device": dev,
           "versions": versions(), "runs": {}}

    def dump():
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=2))

    def record(key, name, fn, warmup):
        times: list = []
        t0 = time.perf_counter()
        best = _timed(fn, a.repeats, warmup, times)
        res["runs"][key] = {"name": name, "tokens_per_s": tokens / best, "best_s": best, "times_s": times, "warmup": warmup,
                            "wall_incl_warmup_s": time.perf_counter() - t0}
        dump()
        print(f"{key}: {name}: {tokens / best:10.0f} tokens/s (timed calls {', '.join(f'{t:.2f}' for t in times)} s; "
              f"{time.perf_counter() - t0:.0f} s with warm-up)", flush=True)
        return best

    print(f"shape {a.shape}, batch {a.batch}, prompt {a.prompt_tokens} + {a.new_tokens} new tokens, device {dev} "
          f"({res['versions'].get('gpu')}), {dtype}", flush=True)
    base = record("baseline", "generate, dynamic cache (rl --rollout hf, the default)",
                  generate_fn(model, ids, a.new_tokens),
                  a.warmup if a.baseline_warmup is None else a.baseline_warmup)
    try:
        import vllm  # noqa: F401
        use_vllm = gpu
    except ImportError:
        use_vllm = False
    if use_vllm:
        folder = tempfile.mkdtemp(prefix="bench-rollout-")
        model.save_pretrained(folder)
        del model
        torch.cuda.empty_cache()
        proj = record("project", "vLLM (--rollout vllm)", vllm_fn(folder, ids, a.new_tokens), a.warmup)
    else:
        proj = record("project", "generate, static compiled KV cache (RLOptions.static_cache)",
                      generate_fn(model, ids, a.new_tokens, cache_implementation="static"), a.warmup)
    res["ratio_project_to_baseline"] = base / proj
    dump()
    print(f"baseline ({res['runs']['baseline']['name']}): {tokens / base:10.0f} tokens/s")
    print(f"project  ({res['runs']['project']['name']}): {tokens / proj:10.0f} tokens/s")
    print(f"ratio project/baseline: {base / proj:.2f}x")


def scaffold(a) -> None:
    import numpy as np
    import torch

    from cellpuzzles.inference.folder import load_model
    from cellpuzzles.inference.prompting import prompt_text
    from cellpuzzles.task.puzzle import read_puzzles
    from cellpuzzles.train.scaffold_rollout import sample_batch

    model, tok, prompt = load_model(a.scaffold)
    if not prompt.restated_genes:
        raise SystemExit(f"{a.scaffold}: not trained on scaffold traces (no restated_genes in cellpuzzles.json)")
    every = read_puzzles(a.puzzles)
    step = max(1, len(every) // a.batch)  # spread over the file: puzzle files are ordered by N
    puzzles = [prompt.apply(p) for p in every[::step][: a.batch]]
    model.eval()
    rng = np.random.default_rng(0)
    lengths = []

    def project():
        lengths[:] = [len(r[0]) for r in sample_batch(model, tok, puzzles, prompt.restated_genes, 1.0, rng)]

    proj = _timed(project, a.repeats)
    new = int(round(np.mean(lengths)))
    # plain generate: the same prompts, left-padded into one batch, as many new tokens each
    rows = [tok(prompt_text(tok, p), add_special_tokens=False)["input_ids"] for p in puzzles]
    width = max(map(len, rows))
    pad = tok.pad_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = (ids != pad).long()

    def plain():
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                           max_new_tokens=new, min_new_tokens=new, pad_token_id=pad)

    base = _timed(plain, a.repeats)
    tokens = sum(lengths)
    print(f"scaffold model {a.scaffold}: {len(puzzles)} puzzles, {tokens / len(puzzles):.0f} completion tokens each "
          f"(of which {sum(p.n for p in puzzles) / len(puzzles):.1f} sampled types)")
    print(f"baseline (generate, batch {len(puzzles)}, {new} new tokens): {len(puzzles) * new / base:10.0f} tokens/s")
    print(f"project  (scaffold rollouts, batched):         {tokens / proj:10.0f} tokens/s")
    print(f"ratio project/baseline: {(tokens / proj) / (len(puzzles) * new / base):.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=list(SHAPES), default="0.5b")
    ap.add_argument("--scaffold", default=None, help="a scaffold-trained model folder: compare its scaffold rollouts")
    ap.add_argument("--puzzles", default=None, help="with --scaffold: puzzles JSONL (e.g. the run's train.jsonl)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2, help="full-length warm-up calls before timing")
    ap.add_argument("--baseline-warmup", type=int, default=None,
                    help="--shape: warm-up calls for the dynamic-cache baseline (default --warmup; it compiles nothing)")
    ap.add_argument("--json", default=None, help="--shape: write the results here")
    a = ap.parse_args()
    if a.scaffold:
        if not a.puzzles:
            raise SystemExit("--scaffold needs --puzzles FILE.jsonl")
        scaffold(a)
    else:
        shapes(a)


if __name__ == "__main__":
    main()

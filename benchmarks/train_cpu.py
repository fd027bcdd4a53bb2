"""Tiny-model training speed on CPU, so regressions show.

Measures, in one run on the bundled data:
  * SFT steps/s and tokens/s through the project's SFT path (TRL SFTTrainer, length-grouped
    batches) against a plain PyTorch loop (AdamW, random batches padded to the longest) on
    the same model shape and batch size: the baseline;
  * GRPO and PPO steps/s through the project's RL path.

Usage: python benchmarks/train_cpu.py [--steps 40] [--rl-steps 4]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rl-steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=32)
    a = ap.parse_args()

    import torch

    from cellpuzzles.data.bundled import materialise
    from cellpuzzles.data.cells import CellsOptions, build_cells
    from cellpuzzles.data.sample import PuzzleOptions, make_splits
    from cellpuzzles.distill.teachers.markers import MarkersTeacher
    from cellpuzzles.distill.traces import DistillOptions, distill, read_traces
    from cellpuzzles.inference.folder import PromptOptions, load_model
    from cellpuzzles.train.callbacks import MetricsLogger
    from cellpuzzles.train.rl import train_rl
    from cellpuzzles.train.rl_common import RLOptions
    from cellpuzzles.train.sft import SFTOptions, conversations, sft
    from cellpuzzles.train.tiny import build_tiny

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    cells = build_cells(materialise(work / "data"), CellsOptions(progress=False))
    splits, _ = make_splits(cells, PuzzleOptions(reasoning_fraction=0.5))
    distill(splits["reasoning"], MarkersTeacher(splits["reasoning"] + splits["train"]), DistillOptions(), work / "t.jsonl")
    pairs = read_traces(work / "t.jsonl")
    init = build_tiny([p for p, _ in pairs], [t for _, t in pairs], work / "init", prompt=PromptOptions(genes_per_cell=15))
    print(f"torch threads: {torch.get_num_threads()}  batch {a.batch_size}  traces {len(pairs)}")

    # baseline: plain loop, random batches, loss on every token
    model, tok, prompt = load_model(init)
    rows = conversations(pairs, prompt)
    texts = [tok.apply_chat_template(r["prompt"] + r["completion"], tokenize=False) for r in rows]
    random.Random(0).shuffle(texts)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    t0, real = time.perf_counter(), 0
    for s in range(a.steps):
        enc = tok(texts[s * a.batch_size:(s + 1) * a.batch_size], return_tensors="pt", padding=True)
        model(**enc, labels=enc["input_ids"]).loss.backward()
        opt.step()
        opt.zero_grad()
        real += int(enc["attention_mask"].sum())
    base_s = time.perf_counter() - t0
    base = (a.steps / base_s, real / base_s)

    log = MetricsLogger("sft")
    t0 = time.perf_counter()
    sft(pairs, init, work / "sft", SFTOptions(max_steps=a.steps, batch_size=a.batch_size, logging_steps=a.steps,
                                               save_steps=10**6, eval_steps=10**6, resume=False), callbacks=[log])
    proj_s = time.perf_counter() - t0  # includes tokenising the dataset and saving the model
    train_s = next(h["train_runtime"] for h in log.history if "train_runtime" in h)
    per_step = real / a.steps  # same data and batch size: the same real (unpadded) tokens per step on average
    proj = (a.steps / train_s, per_step * a.steps / train_s)
    print(f"SFT baseline (plain loop)   : {base[0]:6.2f} steps/s  {base[1]:8.0f} tokens/s")
    print(f"SFT project (TRL, grouped)  : {proj[0]:6.2f} steps/s  {proj[1]:8.0f} tokens/s  "
          f"(train loop only; {proj_s:.1f}s with setup and save)")
    print(f"ratio project/baseline      : {proj[0] / base[0]:.2f}x (real tokens/s counted the same way for both)")

    for algo in ("grpo", "ppo"):
        log = MetricsLogger(algo)
        t0 = time.perf_counter()
        train_rl(splits["train"][:200], splits["test"][:8], work / "sft", work / algo,
                 RLOptions(algo=algo, max_steps=a.rl_steps, prompts_per_step=8, num_generations=4,
                           eval_steps=10**6, resume=False), log)
        dt = time.perf_counter() - t0
        print(f"{algo.upper():4} project: {a.rl_steps / dt:6.3f} steps/s (8 prompts/step, {a.rl_steps} steps incl. setup)")


if __name__ == "__main__":
    main()

"""Benchmark: GRPO steps/s on the production-shaped model with scaffold rollouts.

The production-shaped model (tests/helpers/production.py: byte-level BPE, cell-type names of
several tokens, a small random Qwen2), marked as trained on scaffold traces, runs the same
GRPO settings (TRL's GRPOTrainer through ``train.grpo.train_grpo``, same puzzles, seed, steps)
twice in the same run:

* baseline: the rollouts as they were for multi-token names (copied below as
  ``old_sample_batch``: one puzzle at a time, one forward per slot over copied KV caches, each
  name tokenized alone and appended, so the ids were not the text's canonical tokens);
* project: ``train.scaffold_rollout.sample_batch`` (all rollouts of a step and all candidates of
  a slot in one forward pass, canonical ids; ``inference/slot_batch.py``).

Prints steps/s (CPU seconds of this process, one torch thread, so other work on a shared
machine does not decide the figure; wall seconds beside) for both and the ratio.

    python benchmarks/grpo_bpe.py [--steps 3] [--prompts 2] [--generations 4] [--genes 8]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def old_sample_completion(model, tok, p, k: int, temperature: float, rng):
    """One scaffold rollout, as the per-puzzle path wrote it (pieces tokenized one by one)."""
    from cellpuzzles.inference.decode import PrefixCache, slot_scores
    from cellpuzzles.inference.prompting import prompt_text
    from cellpuzzles.task.puzzle import ANSWER_SEP
    from cellpuzzles.task.scaffold import cell_line

    def extend(ids, mask, lps, text):
        new = tok(text, add_special_tokens=False)["input_ids"]
        ids += new
        mask += [0] * len(new)
        lps += [0.0] * len(new)

    head = prompt_text(tok, p)
    ids, mask, lps = [], [], []
    text = ""
    chosen: list[str] = []
    state = PrefixCache(model)
    for i in range(p.n):
        piece = ("<think>" if i == 0 else "\n") + cell_line(i, p.genes[i], k)
        extend(ids, mask, lps, piece)
        text += piece
        scores = slot_scores(model, tok, head + text, p.candidates, state)
        used = {p.candidates.index(c) for c in chosen}
        free = [j for j in range(len(scores)) if j not in used]
        z = scores[free] / max(temperature, 1e-6)
        prob = np.exp(z - z.max())
        j = free[int(rng.choice(len(free), p=prob / prob.sum()))]
        state.commit(j)
        chosen.append(p.candidates[j])
        text += p.candidates[j]
        own = tok(p.candidates[j], add_special_tokens=False)["input_ids"]
        ids += own
        mask += [1] * len(own)
        lps += [float(scores[j]) / len(own)] * len(own)
    extend(ids, mask, lps, f"</think>\n<answer>{ANSWER_SEP.join(chosen)}</answer>")
    if tok.eos_token_id is not None:
        ids, mask, lps = ids + [tok.eos_token_id], mask + [0], lps + [0.0]
    return ids, mask, lps


def old_sample_batch(model, tok, puzzles, k, temperature, rng):
    return [old_sample_completion(model, tok, p, k, temperature, rng) for p in puzzles]


def run(train, folder, out: Path, a, rollout) -> tuple[float, float, int]:
    """(CPU seconds, wall seconds, steps) of one GRPO run with ``rollout`` as sample_batch."""
    import cellpuzzles.train.scaffold_rollout as sr
    from cellpuzzles.train.callbacks import MetricsLogger
    from cellpuzzles.train.rl import train_rl
    from cellpuzzles.train.rl_common import RLOptions

    real = sr.sample_batch
    sr.sample_batch = rollout
    try:
        opt = RLOptions(algo="grpo", max_steps=a.steps, prompts_per_step=a.prompts, num_generations=a.generations,
                        learning_rate=1e-3, beta=0.001, use_lora=False, eval_steps=10_000, save_steps=10_000,
                        resume=False, seed=0)
        logger = MetricsLogger("rl")
        c, w = time.process_time(), time.perf_counter()
        train_rl(train, [], folder, out, opt, logger)
        return time.process_time() - c, time.perf_counter() - w, a.steps
    finally:
        sr.sample_batch = real


def rollouts_alone(train, folder, a) -> tuple[float, float]:
    """CPU seconds of 3 rounds of one step's rollouts (the same puzzles), old and new."""
    from cellpuzzles.inference.folder import load_model
    from cellpuzzles.train.scaffold_rollout import sample_batch

    model, tok, prompt = load_model(folder)
    shown = [prompt.apply(p) for p in train[: a.prompts] for _ in range(a.generations)]
    out = []
    for fn in (old_sample_batch, sample_batch):
        rng = np.random.default_rng(0)
        c = time.process_time()
        for _ in range(3):
            fn(model, tok, shown, a.restated, 1.0, rng)
        out.append(time.process_time() - c)
    return out[0], out[1]


def main(argv=None) -> int:
    import torch
    from constrained_bpe import build

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--genes", type=int, default=8)
    ap.add_argument("--restated", type=int, default=3)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    import cellpuzzles.train.scaffold_rollout as sr

    with tempfile.TemporaryDirectory() as d:
        splits, folder = build(Path(d), a.genes, a.restated, 8)
        train = splits["train"]
        print(f"GRPO on the production-shaped model: {a.steps} steps of {a.prompts} prompts x {a.generations} "
              f"rollouts, puzzles N {min(p.n for p in train)}-{max(p.n for p in train)}, one torch thread", flush=True)
        run(train, folder, Path(d) / "warm", argparse.Namespace(**{**vars(a), "steps": 1}), sr.sample_batch)
        alone = rollouts_alone(train, folder, a)
        old = run(train, folder, Path(d) / "old", a, old_sample_batch)
        new = run(train, folder, Path(d) / "new", a, sr.sample_batch)
    for name, (cpu, wall, steps) in (("baseline (per-puzzle rollouts)", old), ("project  (batched, canonical)", new)):
        print(f"{name}: {steps / cpu:.3f} steps/s ({cpu / steps:.1f} CPU s/step; wall {wall / steps:.1f} s/step)")
    print(f"ratio {old[0] / new[0]:.2f}x (CPU time)")
    print(f"the rollouts alone ({a.prompts} prompts x {a.generations}, 3 rounds): baseline {alone[0]:.2f} CPU s, "
          f"project {alone[1]:.2f} CPU s, ratio {alone[0] / alone[1]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

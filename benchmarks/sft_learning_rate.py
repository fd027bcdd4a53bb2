"""Does SFT teach the tiny model the cell types, at a given learning rate? (the tiny default's rate)

Builds the tiny model (marker-initialised, seed 0) on a run's distilled traces minus 200 held
out, trains ``--steps`` SFT steps at each ``--lr``, and prints, per rate, the teacher-forced
accuracy of the cell-type token right after ``->`` on the held-out traces (the decision the
constrained decoder takes; chance is about 1 in 10) and the final training loss. Rates are run
one after another in this process, same data, same init: the first is the baseline of the ratio.

    python benchmarks/sft_learning_rate.py --traces RUN/pipeline/*/distill/traces/traces.jsonl \
        [--steps 300] [--lr 1e-3 2e-3 5e-3]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def type_accuracy(folder, held) -> float:
    import torch

    from cellpuzzles.inference.folder import load_model

    model, tok, prompt = load_model(folder)
    model.eval()
    arrow = tok.convert_tokens_to_ids(" -> ")
    hit = total = 0
    for p, trace in held:
        text = tok.apply_chat_template(prompt.apply(p).messages() + [{"role": "assistant", "content": trace}],
                                       tokenize=False)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            pred = model(ids).logits[0, :-1].argmax(-1)
        at = (ids[0, :-1] == arrow).nonzero().flatten()
        hit += (pred[at] == ids[0, 1:][at]).sum().item()
        total += len(at)
    return hit / max(total, 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--traces", required=True, help="traces.jsonl of a run's distill step")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, nargs="+", default=[1e-3, 2e-3, 5e-3])
    a = ap.parse_args(argv)

    import torch

    from cellpuzzles.distill.traces import read_traces
    from cellpuzzles.inference.folder import PromptOptions
    from cellpuzzles.train.sft import SFTOptions, sft
    from cellpuzzles.train.tiny import TinyConfig, build_tiny

    torch.set_num_threads(1)
    pairs = read_traces(a.traces)
    train, held = pairs[:-200], pairs[-200:]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        init = build_tiny([p for p, _ in train], [t for _, t in train], Path(d) / "init", TinyConfig(seed=0),
                          PromptOptions(genes_per_cell=6))
        for lr in a.lr:
            out = sft(train, init, Path(d) / f"sft_{lr}", SFTOptions(max_steps=a.steps, learning_rate=lr, seed=0,
                                                                   eval_fraction=0.0))
            rows.append((lr, type_accuracy(out, held)))
            print(f"lr {lr:g}: type accuracy after '->' {rows[-1][1]:.3f} on {len(held)} held-out traces", flush=True)
    base = rows[0][1]
    for lr, acc in rows:
        print(f"lr {lr:g}: {acc:.3f} ({acc / base:.2f}x the first rate's)" if base else f"lr {lr:g}: {acc:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""How many SFT steps should the tiny default take? (its gap to the 6-gene ceiling, across split seeds)

For each finished `cellpuzzles run` given, retrains SFT from that run's own untrained start
(`sft/start`) on its own distilled traces with each ``--steps`` value (everything else the
pipeline's defaults, the run's seed), decodes the run's test puzzles constrained, and prints
the batch accuracy beside the run's own SFT model (the default step count, read from the run's
`summary.json`, the baseline of the ratio) and the classifier shown the same 6 genes
(`ceiling_top6`, the ceiling of the model's input). One line per run and step count, then the
mean over runs.

Choosing the step count on seeds whose test puzzles are printed here is tuning on those
seeds' test sets: pick on some seeds, confirm on others (the closing note says which).

    python benchmarks/tiny_sft_steps.py --run runs/seed0 runs/seed1 [--steps 300 600]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def run_parts(run: Path) -> dict:
    """The pieces of a finished run this benchmark needs (newest pipeline folder)."""
    summary = json.loads((run / "summary.json").read_text())
    pipe = Path(summary["pipeline"]["folder"])
    return {"start": pipe / "sft" / "start", "traces": pipe / "distill" / "traces" / "traces.jsonl",
            "test": pipe / "puzzles" / "puzzle_set" / "test.jsonl", "summary": summary}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", nargs="+", required=True, type=Path, help="output folders of `cellpuzzles run`")
    ap.add_argument("--steps", type=int, nargs="+", default=[300, 600])
    a = ap.parse_args(argv)

    import torch

    from cellpuzzles.distill.traces import read_traces
    from cellpuzzles.evaluation.evaluate import evaluate_model
    from cellpuzzles.pipelines.report import batch_accuracy
    from cellpuzzles.task.puzzle import read_puzzles
    from cellpuzzles.train.sft import SFTOptions, sft

    torch.set_num_threads(2)
    table: dict[int, list[float]] = {s: [] for s in a.steps}
    base_all, ceil_all = [], []
    for run in a.run:
        parts = run_parts(run)
        seed = int(parts["summary"]["seed"])
        base, ceiling = batch_accuracy(parts["summary"], "sft"), batch_accuracy(parts["summary"], "ceiling_top6")
        base_all.append(base)
        ceil_all.append(ceiling)
        pairs, test = read_traces(parts["traces"]), read_puzzles(parts["test"])
        print(f"{run}: seed {seed}, default SFT {base:.3f}, ceiling_top6 {ceiling:.3f}", flush=True)
        for steps in a.steps:
            with tempfile.TemporaryDirectory() as d:
                out = sft(pairs, parts["start"], Path(d) / "sft", SFTOptions(max_steps=steps, seed=seed))
                acc = evaluate_model(out, test, modes=("constrained",), seed=seed)["constrained"]["batch_accuracy"]
            table[steps].append(acc)
            ratio = f"{acc / base:.2f}x the default's" if base else "default scored 0"
            print(f"  {steps} steps: batch accuracy {acc:.3f} ({ratio}; ceiling {ceiling:.3f})", flush=True)
    n = len(a.run)
    print(f"mean over {n} runs: default SFT {sum(base_all) / n:.3f}, ceiling_top6 {sum(ceil_all) / n:.3f}")
    for steps, accs in table.items():
        print(f"mean over {n} runs: {steps} steps {sum(accs) / n:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

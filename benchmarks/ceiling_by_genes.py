"""How much does showing more genes raise the ceiling of the model's input? (across split seeds)

For each finished `cellpuzzles run` given, fits the input-ceiling classifier (logistic
regression on each cell's top-K gene names, rank-weighted, assigned one-to-one:
``cellpuzzles.evaluation.peers.ceiling_completions``) on the run's train puzzles for each
``--genes`` K and prints its batch accuracy on the run's test puzzles, with its ratio to K=6
(the tiny default's view, the baseline), then the mean over runs. A K at which the ceiling
does not rise is not worth the longer prompts for the tiny model.

    python benchmarks/ceiling_by_genes.py --run runs/seed0 runs/seed1 [--genes 6 8 10 12 16 20 50]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

BASELINE_K = 6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", nargs="+", required=True, type=Path, help="output folders of `cellpuzzles run`")
    ap.add_argument("--genes", type=int, nargs="+", default=[6, 8, 10, 12, 16, 20, 50])
    a = ap.parse_args(argv)

    from cellpuzzles.evaluation.evaluate import load_split_dir
    from cellpuzzles.evaluation.peers import ceiling_completions
    from cellpuzzles.task.reward import score

    ks = sorted({BASELINE_K, *a.genes})
    table: dict[int, list[float]] = {k: [] for k in ks}
    for run in a.run:
        summary = json.loads((run / "summary.json").read_text())
        train, test = load_split_dir(Path(summary["pipeline"]["folder"]) / "puzzles" / "puzzle_set")
        answers = [p.answer_text for p in test]
        accs = {k: score(ceiling_completions(train, test, k), answers, n_boot=0)["batch_accuracy"] for k in ks}
        for k, acc in accs.items():
            table[k].append(acc)
        base = accs[BASELINE_K]
        print(f"{run} (seed {summary['seed']}): " + ", ".join(
            f"{k} → {acc:.3f}" + (f" ({acc / base:.2f}x)" if base and k != BASELINE_K else "") for k, acc in accs.items()),
            flush=True)
    n = len(a.run)
    base = sum(table[BASELINE_K]) / n
    print(f"mean over {n} runs: " + ", ".join(
        f"{k} → {sum(v) / n:.3f}" + (f" ({sum(v) / n / base:.2f}x)" if base and k != BASELINE_K else "")
        for k, v in table.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

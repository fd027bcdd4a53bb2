"""Do the intervals hold across split seeds? (issue 16: "uncertainty that covers what varies")

For split seeds 0..S-1 on the bundled PBMC data (the pipeline's default puzzle options), the
marker-gene solver and the classical peer (logistic regression, one-to-one) are fitted on each
seed's train cells and scored on its test puzzles. Each seed's 95% interval for batch accuracy is
computed two ways: the old bootstrap over test puzzles, and the new one that resamples test cells
(``cellpuzzles.evaluation.compare.cell_weights``). Coverage = the share of (seed i, seed j != i)
pairs in which seed i's interval contains seed j's point estimate.

A reference for reading it: if estimates were normal with the interval's own spread, an ideal 95%
interval would contain another independent estimate ~83% of the time (|X - Y| < 1.96 sigma with
X - Y ~ N(0, 2 sigma^2)). Much lower means the interval understates what changes with the split.

    python benchmarks/interval_coverage.py [--seeds 5] [--n-boot 1000]
"""

from __future__ import annotations

import argparse
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--n-boot", type=int, default=1000)
    a = ap.parse_args()

    import numpy as np

    from cellpuzzles.data.bundled import materialise
    from cellpuzzles.data.cells import CellsOptions, build_cells
    from cellpuzzles.data.options import PuzzleOptions
    from cellpuzzles.evaluation.compare import known_cells, weights_for
    from cellpuzzles.evaluation.peers import ONE_TO_ONE, peer_completions, read_expression, write_expression
    from cellpuzzles.task.reward import puzzle_weights, score
    from cellpuzzles.task.solvers import complete_all, make_solver

    t0 = time.time()
    tmp = tempfile.mkdtemp(prefix="coverage.")
    f = materialise(tmp)
    cells = build_cells(f, CellsOptions(top_k=50, progress=False))
    expression = read_expression(write_expression(f, list(cells.obs["cell_id"]), f"{tmp}/expression.h5ad"))
    from cellpuzzles.data.sample import make_splits

    rows = {}  # solver -> per seed (point, puzzle CI, cell CI)
    for seed in range(a.seeds):
        splits, _ = make_splits(cells, PuzzleOptions(seed=seed))
        train, test = splits["train"] + splits.get("reasoning", []), splits["test"]
        answers = [p.answer_text for p in test]
        comps = {"markers": complete_all(make_solver("markers", seed).fit(train), test),
                 "logreg_1to1": peer_completions(train, test, expression)[ONE_TO_ONE]}
        wp = puzzle_weights(len(test), a.n_boot, seed)
        wc, scheme = weights_for(known_cells(test), [p.answer for p in test], len(test), a.n_boot, seed)
        assert scheme == "cells"
        share = max(sum(c in p.cell_ids for p in test) for c in {c for p in test for c in p.cell_ids}) / len(test)
        for name, cs in comps.items():
            sp_, sc_ = score(cs, answers, weights=wp), score(cs, answers, weights=wc)
            rows.setdefault(name, []).append((sp_["batch_accuracy"], sp_["batch_accuracy_ci"], sc_["batch_accuracy_ci"]))
        print(f"seed {seed}: {len(test)} test puzzles, {len({c for p in test for c in p.cell_ids})} test cells, "
              f"the most shared cell in {share:.0%} of them", flush=True)

    print()
    for name, rs in rows.items():
        print(f"{name}: batch accuracy per split seed, 95% interval by puzzle bootstrap | by cell bootstrap")
        for seed, (pt, cp, cc) in enumerate(rs):
            print(f"  seed {seed}  {pt:.3f}  puzzles [{cp[0]:.3f}, {cp[1]:.3f}] (width {cp[1] - cp[0]:.3f})  "
                  f"cells [{cc[0]:.3f}, {cc[1]:.3f}] (width {cc[1] - cc[0]:.3f})")
        pts = [r[0] for r in rs]
        for label, k in (("puzzle bootstrap (before)", 1), ("cell bootstrap (after)", 2)):
            hits = [rs[i][k][0] <= pts[j] <= rs[i][k][1] for i in range(len(rs)) for j in range(len(rs)) if i != j]
            width = np.mean([r[k][1] - r[k][0] for r in rs])
            print(f"  coverage of the other seeds' estimates, {label}: {sum(hits)}/{len(hits)} = "
                  f"{np.mean(hits):.2f}; mean width {width:.3f}")
        print(f"  spread of the point estimates: {min(pts):.3f}-{max(pts):.3f} (sd {np.std(pts, ddof=1):.3f})\n")
    print(f"done in {time.time() - t0:.0f} s (reference for an ideal 95% interval: ~0.83)")


if __name__ == "__main__":
    main()

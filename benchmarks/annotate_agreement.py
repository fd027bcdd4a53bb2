"""How often `cellpuzzles annotate` gives each cluster its majority type, beside the tools an
analyst would use instead, on the same groups.

pbmc68k_reduced as scanpy ships it: 11 `louvain` clusters (X_umap, scaled X, raw.X), the 10
`bulk_labels` types as candidates. For each cluster the reference is its majority bulk_labels
type (types repeat across clusters: Dendritic x4, CD19+ B x2, CD4+/CD25 T Reg x2, so no
one-to-one labelling can reach 11/11). Rows:

  model (local) under capacity=2 (the default for 11 groups and 10 candidates), capacity=3,
  independent; one-to-one on the 10 largest clusters; model (endpoint, a real `cellpuzzles serve`)
  under capacity=2; the marker solver (cellpuzzles.task.solvers, fitted on the run's training
  puzzles) and a logistic regression (scikit-learn, fitted on the run's training cells' raw.X)
  scoring the same groups, assigned under the same rules; and the best any labelling can do
  under each rule (the ceiling). Finally the per-cell path: the run's test puzzles annotated as
  groups of one cell each, against `decode.constrained` on the same puzzles (same answers expected).

    python benchmarks/annotate_agreement.py --model RUN/sft/model --puzzles RUN/puzzles [--data data/pbmc68k_reduced.h5ad]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd


def majority(obs: pd.DataFrame) -> pd.Series:
    return obs.groupby("louvain", observed=True)["bulk_labels"].agg(lambda s: s.value_counts().index[0]).astype(str)


def agreement(groups, assigned, maj: pd.Series) -> str:
    ok = [a == maj[g] for g, a in zip(groups, assigned)]
    return f"{sum(ok)}/{len(ok)} ({sum(ok) / len(ok):.2f})"


def ceiling(groups, maj: pd.Series, cands: list[str], rule) -> str:
    """The most clusters any labelling under the rule can give their majority type."""
    from cellpuzzles.annotate.assignment import assign_columns

    s = np.array([[1.0 if maj[g] == c else 0.0 for c in cands] for g in groups])
    cols = assign_columns(s, rule)
    return agreement(groups, [cands[j] for j in cols], maj)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a trained model folder (e.g. the pipeline's sft/model or rl/model)")
    ap.add_argument("--puzzles", required=True, help="the run's puzzles folder (train/reasoning/test .jsonl)")
    ap.add_argument("--data", default=None, help="the run's .h5ad (default: materialise the bundled file)")
    ap.add_argument("--no-endpoint", action="store_true", help="skip the `cellpuzzles serve` row")
    ap.add_argument("--cell-puzzles", type=int, default=20, help="test puzzles for the per-cell check")
    a = ap.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)

    import anndata as ad
    import scanpy as sc
    from sklearn.linear_model import LogisticRegression

    from cellpuzzles.annotate.api import annotate
    from cellpuzzles.annotate.assignment import assign_columns
    from cellpuzzles.annotate.groups import build_groups
    from cellpuzzles.annotate.options import AnnotateOptions, Assignment, parse_assignment
    from cellpuzzles.data.bundled import materialise
    from cellpuzzles.task.puzzle import read_puzzles
    from cellpuzzles.task.solvers import MarkerSolver

    pbmc = sc.datasets.pbmc68k_reduced()
    cands = sorted(pbmc.obs["bulk_labels"].astype(str).unique())
    maj = majority(pbmc.obs)
    top10 = pbmc.obs["louvain"].value_counts().index[:10]
    pbmc10 = pbmc[pbmc.obs["louvain"].isin(top10)].copy()
    pbmc10.obs["louvain"] = pbmc10.obs["louvain"].cat.remove_unused_categories()
    pdir = Path(a.puzzles)
    train = read_puzzles(pdir / "train.jsonl") + read_puzzles(pdir / "reasoning.jsonl")
    rows = []

    def opts(rule: str) -> AnnotateOptions:
        return AnnotateOptions(groupby="louvain", assignment=rule, progress=False)

    def row(name, rule, groups, assigned, seconds=None):
        rows.append({"method": name, "assignment": rule, "agreement": agreement(groups, assigned, maj),
                     "ceiling": ceiling(groups, maj, cands, parse_assignment(rule)),
                     "seconds": "" if seconds is None else f"{seconds:.1f}"})

    # the model, local, each rule
    for data, rule in ((pbmc, "capacity=2"), (pbmc, "capacity=3"), (pbmc, "independent"), (pbmc10, "one-to-one")):
        t = time.time()
        res = annotate(data, cands, model=a.model, options=opts(rule))
        row("model (local, constrained)", rule, res.table["group"], res.table["assigned_type"], time.time() - t)
    # the model through a real `cellpuzzles serve`
    if not a.no_endpoint:
        import subprocess
        import urllib.request

        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from helpers.net import free_port

        port = free_port()
        log = open(Path(a.puzzles) / "annotate-serve.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", "cellpuzzles.cli", "serve", "--model", a.model, "--port", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                try:
                    if urllib.request.urlopen(url + "/v2/models/cellpuzzles/ready", timeout=2).status == 200:
                        break
                except OSError:
                    time.sleep(0.5)
            t = time.time()
            res = annotate(pbmc, cands, endpoint=url, options=opts("capacity=2"))
            row("model (endpoint, constrained)", "capacity=2", res.table["group"], res.table["assigned_type"],
                time.time() - t)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    # the marker solver on the same groups (top 50 genes: the solver's usual input), same rules
    from cellpuzzles.task.puzzle import Puzzle

    g50 = build_groups(pbmc, "louvain", 50)
    solver = MarkerSolver().fit(train)
    p = Puzzle(genes=g50.genes, candidates=cands, answer=list(g50.table["group"]), context="")
    ms = solver.scores(p)
    # a logistic regression on the run's training cells (raw.X: log1p counts per 10k), applied to each group's mean
    train_ids = sorted({c for q in train for c in q.cell_ids})
    X = pbmc.raw.X.toarray() if hasattr(pbmc.raw.X, "toarray") else np.asarray(pbmc.raw.X)
    idx = pbmc.obs_names.get_indexer(train_ids)
    idx = idx[idx >= 0]
    lr = LogisticRegression(max_iter=2000).fit(X[idx], pbmc.obs["bulk_labels"].astype(str).to_numpy()[idx])
    means = np.stack([X[(pbmc.obs["louvain"] == g).to_numpy()].mean(0) for g in g50.table["group"]])
    lp = lr.predict_log_proba(means)[:, [list(lr.classes_).index(c) for c in cands]]
    for name, scores in (("marker solver", ms), ("logistic regression", lp)):
        for rule in ("capacity=2", "capacity=3", "independent"):
            cols = assign_columns(scores, parse_assignment(rule))
            row(name, rule, g50.table["group"], [cands[j] for j in cols])
        keep = [i for i, g in enumerate(g50.table["group"]) if g in set(top10)]
        cols = assign_columns(scores[keep], Assignment("one-to-one", 1))
        row(name, "one-to-one", g50.table["group"].iloc[keep], [cands[j] for j in cols])
    print(f"pbmc68k_reduced: {len(maj)} louvain clusters, {len(cands)} bulk_labels candidates; "
          f"agreement = clusters given their majority type (one-to-one: the 10 largest clusters)")
    table = pd.DataFrame(rows)
    share = table["agreement"].str.extract(r"\(([0-9.]+)\)")[0].astype(float)
    base = {r: share[i] for i, r in zip(table.index, table["assignment"]) if table.loc[i, "method"] == "marker solver"}
    table["ratio to markers"] = [f"{s / base[r]:.2f}" if base.get(r) else "" for s, r in zip(share, table["assignment"])]
    print(table.to_string(index=False))

    # the per-cell path: test puzzles annotated as one-cell groups give decode.constrained's answers
    from cellpuzzles.inference.decode import constrained
    from cellpuzzles.inference.folder import load_model

    data = Path(a.data) if a.data else materialise(Path(a.puzzles) / "data")
    full = ad.read_h5ad(data)
    model, tok, prompt = load_model(a.model)
    tests = read_puzzles(pdir / "test.jsonl")[: a.cell_puzzles]
    same = right_a = right_d = 0
    for q in tests:
        sub = full[q.cell_ids].copy()
        sub.obs["cell"] = pd.Categorical(q.cell_ids, categories=q.cell_ids)
        res = annotate(sub, q.candidates, model=a.model,
                       options=AnnotateOptions(groupby="cell", assignment="one-to-one", top_k=len(q.genes[0]), progress=False))
        mine = list(res.table["assigned_type"])
        theirs = constrained(model, tok, prompt.apply(q), "", prompt.restated_genes)[0]
        theirs = theirs.split("<answer>")[1].split("</answer>")[0].split(" | ")
        same += mine == theirs
        right_a += mine == q.answer
        right_d += theirs == q.answer
    n = len(tests)
    print(f"per-cell puzzles ({n} test puzzles as one-cell groups): same answer as decode.constrained {same}/{n}; "
          f"batch accuracy annotate {right_a / n:.3f} vs decode.constrained {right_d / n:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

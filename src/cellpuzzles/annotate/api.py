"""``cellpuzzles.annotate(adata, candidates, groupby=..., model=FOLDER | endpoint=URL)``: label an
analyst's own groups (clusters), a donor's groups at a time, the way the model was trained."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from cellpuzzles.annotate.assignment import assign_columns, check_fits
from cellpuzzles.annotate.groups import build_groups
from cellpuzzles.annotate.options import INDEPENDENT, AnnotateOptions, Assignment, default_assignment, parse_assignment
from cellpuzzles.annotate.plan import PlannedPuzzle, plan_donor
from cellpuzzles.annotate.result import SCORE_PREFIX, Annotation
from cellpuzzles.core.errors import CellPuzzlesError
from cellpuzzles.data.cells import CellsOptions
from cellpuzzles.data.options import PuzzleOptions


def check_candidates(candidates: Sequence[str] | str) -> list[str]:
    """The candidate types, stripped; one clear line for duplicates (case-insensitive) or too few."""
    items = [candidates] if isinstance(candidates, str) else list(candidates)
    out, seen = [], {}
    for j, c in enumerate(items):
        if not isinstance(c, str) or not c.strip():
            raise CellPuzzlesError(f"--candidates: item {j + 1} is empty; give one cell-type name per item")
        key = c.strip().lower()
        if key in seen:
            raise CellPuzzlesError(f"--candidates: '{c.strip()}' is listed twice (items {seen[key] + 1} and {j + 1}); "
                                   "give each type once")
        seen[key] = j
        out.append(c.strip())
    if len(out) < 2:
        raise CellPuzzlesError(f"--candidates: {len(out)} type given; give at least 2 candidate types")
    return out


def annotate(adata, candidates: Sequence[str], groupby: str = "leiden", donor_key: str | None = None,
             model: str | os.PathLike | None = None, endpoint: str | None = None, mode: str = "constrained",
             top_k: int | None = None, assignment: str | None = None, *, column_map: dict[str, str] | None = None,
             options: AnnotateOptions | None = None, token: str | None = None) -> Annotation:
    """Annotate ``adata``'s groups (``obs[groupby]``) with ``candidates``, per donor.

    ``model`` is a model folder (scored here) or ``endpoint`` the URL of `cellpuzzles serve`
    (its V1 route; the token from ``token`` or $CELLPUZZLES_API_TOKEN). ``assignment``:
    ``one-to-one`` (default when a donor has no more groups than candidates), ``capacity=K`` or
    ``independent``. ``options`` (an :class:`AnnotateOptions`), when given, replaces groupby,
    donor_key, mode, top_k and assignment and adds the endpoint's batching and retry settings.
    Returns an :class:`~cellpuzzles.annotate.result.Annotation`."""
    opt = options or AnnotateOptions(groupby=groupby, donor_key=donor_key, mode=mode, top_k=top_k, assignment=assignment)
    opt.check()
    cands = check_candidates(candidates)
    if (model is None) == (endpoint is None):
        raise CellPuzzlesError("give exactly one of --model FOLDER (a trained model folder) or --endpoint URL")
    if endpoint is not None:
        from cellpuzzles.annotate.endpoint import Endpoint

        source = Endpoint(endpoint, token, opt.batch_size, opt.concurrency, opt.retries, opt.timeout_s)
        shown = None  # the server applies its model's genes per cell
    else:
        from cellpuzzles.inference.folder import check_folder, load_prompt_options

        shown = load_prompt_options(check_folder(model)).genes_per_cell  # the weights load after the checks
    k = opt.top_k or shown or CellsOptions().top_k
    groups = build_groups(adata, opt.groupby, k, opt.donor_key, column_map)
    size = min(opt.max_groups or PuzzleOptions().n_max, len(cands))

    # plan every donor and check every rule before any decoding: bad input costs nothing
    plans: dict[str, tuple[list[int], Assignment, list[PlannedPuzzle]]] = {}
    for d in groups.donors():
        rows = [int(r) for r in np.flatnonzero(groups.table["donor"].to_numpy() == d)]
        rule = parse_assignment(opt.assignment) if opt.assignment else default_assignment(len(rows), len(cands))
        check_fits(rule, len(rows), len(cands), f"donor '{d}'")
        plans[d] = (rows, rule, plan_donor(d, rows, groups.genes, groups.contexts[d], cands, size))
    if endpoint is not None:
        source.check_puzzles([pp.puzzle for _, _, pps in plans.values() for pp in pps])
        source.check()
    else:
        from cellpuzzles.annotate.local import LocalModel

        source = LocalModel(model)

    n = len(groups.table)
    assigned: list[str | None] = [None] * n
    status = ["ok"] * n
    reasoning, puzzle_of, shared = [""] * n, [""] * n, [""] * n
    scores = np.full((n, len(cands)), np.nan)
    notes: list[str] = []
    col_of = {c: j for j, c in enumerate(cands)}
    names = groups.table["group"].astype(str).tolist()
    bar = tqdm(plans.items(), desc="donors", unit="donor", disable=not opt.progress, leave=False)
    for d, (rows, rule, pps) in bar:
        bar.set_postfix_str(d)
        answers = source.answer([pp.puzzle for pp in pps], opt.mode)
        label_of: dict[int, str | None] = {}
        for pp, ans in zip(pps, answers):
            notes += [f"{pp.name}: {x}" for x in ans.notes if f"{pp.name}: {x}" not in notes]
            for i, r in enumerate(pp.rows):
                if r not in pp.home:
                    continue
                puzzle_of[r] = pp.name
                shared[r] = ", ".join(names[q] for q in pp.rows if q != r)
                if ans.error:
                    status[r] = f"failed: {ans.error}"
                    continue
                reasoning[r] = ans.reasoning(i)
                label_of[r] = ans.labels[i]
                if ans.scores is not None:
                    scores[r, [col_of[c] for c in pp.puzzle.candidates]] = ans.scores[i]
                elif ans.labels[i] is None:
                    status[r] = "failed: no valid label for this group in the answer"
        done = [r for r in rows if status[r] == "ok"]
        if done and np.isfinite(scores[done]).all():
            cols = assign_columns(scores[done], rule)  # over the donor's combined scores
            for r, j in zip(done, cols):
                assigned[r] = cands[j]
        else:
            for r in done:
                assigned[r] = label_of.get(r)
            notes += _rule_check(d, rule, [assigned[r] for r in done])
    bar.close()

    table = groups.table.copy()
    table["assigned_type"] = pd.array(assigned, dtype=object)
    table["status"] = status
    table["puzzle"] = puzzle_of
    table["shared_with"] = shared
    table["top_genes"] = [", ".join(g) for g in groups.genes]
    table["reasoning"] = reasoning
    if np.isfinite(scores).any():
        for j, c in enumerate(cands):
            table[SCORE_PREFIX + c] = scores[:, j]
    table = table[["group", "donor", *[c for c in table.columns if c not in ("group", "donor")]]]
    rules = {rule.name for _, rule, _ in plans.values()}
    params = {"groupby": opt.groupby, "donor_key": groups.donor_key, "model": str(model) if model is not None else None,
              "endpoint": endpoint, "mode": opt.mode, "top_k": k, "genes_shown": shown, "max_groups": size,
              "matrix": groups.matrix, "assignment": rules.pop() if len(rules) == 1 else "per donor",
              "assignment_per_donor": [f"{d}: {rule.name}" for d, (_, rule, _) in plans.items()],
              "scores": "constrained log-likelihoods, assigned over each donor's groups" if np.isfinite(scores).any()
              else "none (labels from each group's puzzle)"}
    return Annotation(table=table, candidates=cands, params=params, notes=notes, adata=adata,
                      cell_rows=groups.cell_rows, var_names=groups.var_names)


def _rule_check(donor: str, rule: Assignment, labels: list[str | None]) -> list[str]:
    """Without scores the labels are each puzzle's own answers: say when they break the rule."""
    if rule.kind == INDEPENDENT:
        return []
    counts = pd.Series([x for x in labels if x is not None]).value_counts()
    over = counts[counts > rule.capacity]
    if over.empty:
        return []
    return [f"donor '{donor}': the answers use {', '.join(f'{t} x{c}' for t, c in over.items())}, above {rule.name} "
            "(no scores to reassign: each group keeps its puzzle's answer)"]

"""Each test puzzle as one row of an MLflow GenAI evaluation, in the evaluate step's run.

What a reviewer sees: in the MLflow UI, the experiment opens on its runs (the data step marks it
``mlflow.experimentKind=custom_model_development``; nothing here changes that). On the evaluate
run's page, the **Traces** tab lists one trace per test puzzle of one decoding mode (constrained
by default). A trace's *inputs* are the puzzle id, its N and the chat messages the model was
shown (system + user, genes cut as the model folder's prompt options cut them, before its chat
template); its *outputs* are the parsed answer and the whole completion (``<think>`` reasoning,
then ``<answer>``); its assessments are the gold answer (expectation ``answer``) and two code
scorers, ``batch_reward`` (the Cell-o1 reward, task/reward.py: -1 ill-formed, else (cell
accuracy + exact) / 2) and ``exact_match`` (the step's batch accuracy rule), each with a
rationale saying how many cells were right. The run's metrics gain ``batch_reward/mean`` and
``exact_match/mean``; over every test puzzle, the latter equals ``<mode>/batch_accuracy``.
MLflow also tags the run ``mlflow.runType=genai_evaluate`` (its mark for a run holding rows).

It is ``mlflow.genai.evaluate`` on a static table (no predict function, no LLM judge; it talks
to the tracking store only): MLflow writes a trace per row and an assessment per scorer and
expectation, about 0.15 s a row on a SQLite store on a busy 2-core machine (~60 s for 400
puzzles). So the evaluate step logs the constrained mode only, and at most
``$CELLPUZZLES_GENAI_ROWS`` puzzles (default 100, taken in turn from each N by
evaluation.subset.stratified; ``all``: every test puzzle; ``0``: no rows). With a cap, the
scorers' means are over the logged subset.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time
from collections.abc import Mapping, Sequence

from cellpuzzles.core.errors import CellPuzzlesError
from cellpuzzles.core.tracking import environment_restored
from cellpuzzles.task.puzzle import Puzzle, extract_answer
from cellpuzzles.task.reward import batch_reward, judge

ROWS_ENV = "CELLPUZZLES_GENAI_ROWS"
DEFAULT_ROWS = 100


def row_limit() -> int | None:
    """The evaluate step's cap on logged rows: ``$CELLPUZZLES_GENAI_ROWS`` (an integer, or
    ``all`` for None: no cap), default DEFAULT_ROWS."""
    raw = os.environ.get(ROWS_ENV, "").strip().lower()
    if not raw:
        return DEFAULT_ROWS
    if raw == "all":
        return None
    if not raw.isdigit():
        raise CellPuzzlesError(f"${ROWS_ENV}={raw!r}: give a number of puzzles, 0 for none, or 'all'")
    return int(raw)


def _rows(test: Sequence[Puzzle], completions: Sequence[str], prompt_options) -> list[dict]:
    rows = []
    for p, c in zip(test, completions):
        shown = prompt_options.apply(p) if prompt_options is not None else p
        rows.append({"inputs": {"puzzle_id": p.puzzle_id, "n": p.n, "messages": shown.messages()},
                     "outputs": {"answer": extract_answer(c), "completion": c},
                     "expectations": {"answer": p.answer_text}})
    return rows


def _scorers() -> list:
    from mlflow.entities import Feedback
    from mlflow.genai import scorer

    def why(row: dict) -> str:
        if not row["well_formed"]:
            return "ill-formed: the format rule fails (one <think>…</think> then one <answer>…</answer> with ' | ')"
        return f"{row['correct']} of {row['gold_cells']} cells right" + ("" if row["exact"] else ", not all")

    @scorer(name="batch_reward")
    def reward(outputs: dict, expectations: dict) -> Feedback:
        c, gold = outputs["completion"], expectations["answer"]
        return Feedback(value=batch_reward(c, gold), rationale=why(judge(c, gold)))

    @scorer(name="exact_match")
    def exact(outputs: dict, expectations: dict) -> Feedback:
        row = judge(outputs["completion"], expectations["answer"])
        return Feedback(value=bool(row["exact"]), rationale=why(row))

    return [reward, exact]


def log_puzzle_rows(name: str, test: Sequence[Puzzle], comps: Mapping[str, Sequence[str]], prompt_options=None,
                    mode: str = "constrained", limit: int | None = None) -> dict:
    """Log one GenAI evaluation row per test puzzle (``comps[mode]``, aligned with ``test``) into
    the ACTIVE MLflow run; ``prompt_options`` (inference.folder.PromptOptions, None: as written)
    rebuild the prompt the model saw; ``limit`` caps the rows (every N kept; 0: none). Returns
    {model, mode, rows, puzzles, batch_reward_mean, exact_match_mean, seconds}; raises
    CellPuzzlesError when MLflow stored fewer traces than rows."""
    import mlflow
    import mlflow.genai

    from cellpuzzles.evaluation.subset import stratified

    run = mlflow.active_run()
    if run is None:
        raise CellPuzzlesError("log_puzzle_rows needs an active MLflow run (the evaluate step's)")
    if mode not in comps:
        raise CellPuzzlesError(f"no {mode!r} completions to log (modes: {', '.join(comps) or 'none'})")
    if len(comps[mode]) != len(test):
        raise CellPuzzlesError(f"{len(comps[mode])} {mode} completions for {len(test)} test puzzles")
    by_id = dict(zip((p.puzzle_id for p in test), comps[mode]))
    chosen = stratified(test, limit)
    rows = _rows(chosen, [by_id[p.puzzle_id] for p in chosen], prompt_options)
    if not rows:
        return {"model": name, "mode": mode, "rows": 0, "puzzles": len(test), "seconds": 0.0}
    start = time.time()
    with environment_restored():
        # SQLite allows one writer: MLflow's default 10 workers only queue on its connection pool
        # (and time out after 30 s on 2 cores); 2 keep an HTTP server busy as well.
        os.environ.setdefault("MLFLOW_GENAI_EVAL_MAX_WORKERS", "2")
        os.environ.setdefault("MLFLOW_GENAI_EVAL_MAX_SCORER_WORKERS", "1")
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), (  # MLflow's "open the Traces tab" banner
                contextlib.redirect_stderr(err) if not os.isatty(2) else contextlib.nullcontext()):
            result = mlflow.genai.evaluate(data=rows, scorers=_scorers())
        # in a task log, no progress bar (as our own bars); anything else MLflow printed stays
        sys.stderr.write("".join(line for line in err.getvalue().splitlines(True) if "Evaluating:" not in line))
    stored = mlflow.search_traces(run_id=run.info.run_id, include_spans=False, return_type="list")
    if len(stored) < len(rows):
        raise CellPuzzlesError(f"MLflow stored {len(stored)} of {len(rows)} puzzle traces in run {run.info.run_id}")
    m = result.metrics
    return {"model": name, "mode": mode, "rows": len(rows), "puzzles": len(test),
            "batch_reward_mean": float(m["batch_reward/mean"]), "exact_match_mean": float(m["exact_match/mean"]),
            "seconds": round(time.time() - start, 1)}

"""Trainer callbacks: metrics to MLflow (when a run is active) and to a history list, and
batch accuracy on a validation subset every few steps."""

from __future__ import annotations

import math
from collections.abc import Sequence

from transformers import TrainerCallback

from cellpuzzles.task.puzzle import Puzzle
from cellpuzzles.task.reward import score


class MetricsLogger(TrainerCallback):
    """Numeric trainer logs -> ``history`` and the active MLflow run, prefixed."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.history: list[dict] = []

    def record(self, metrics: dict, step: int) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(float(v))}
        if not clean:
            return
        self.history.append({"step": step, **clean})
        try:
            import mlflow

            if mlflow.active_run():
                mlflow.log_metrics({f"{self.prefix}/{k}".replace("//", "/"): v for k, v in clean.items()}, step=step)
        except ImportError:
            pass

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            self.record(logs, state.global_step)


class ValidationAccuracy(TrainerCallback):
    """Decoding of a few held-out puzzles every ``every`` steps; logs val_* metrics. Greedy
    free decoding, or for a model trained on scaffold traces (``restated_genes``) the
    constrained scaffold decoding that serving uses."""

    def __init__(self, puzzles: Sequence[Puzzle], tokenizer, logger: MetricsLogger, every: int = 10,
                 restated_genes: int | None = None, tokens_per_cell: float | None = None):
        self.puzzles = list(puzzles)
        self.tokens_per_cell = tokens_per_cell  # the model's free-decoding budget (inference.budget)
        self.tok = tokenizer
        self.logger = logger
        self.every = max(1, every)
        self.restated_genes = restated_genes

    def _run(self, model, step: int) -> None:
        from cellpuzzles.inference.decode import DecodeOptions, constrained_many, generate

        if not self.puzzles or model is None:
            return
        was_training = model.training
        if self.restated_genes:
            completions = constrained_many(model, self.tok, self.puzzles, [""] * len(self.puzzles), self.restated_genes)
        else:
            completions = generate(model, self.tok, self.puzzles, DecodeOptions(batch_size=len(self.puzzles),
                                                                                     tokens_per_cell=self.tokens_per_cell))
        s = score(completions, [p.answer_text for p in self.puzzles], n_boot=0)
        self.logger.record({f"val_{k}": s[k] for k in ("batch_accuracy", "cell_accuracy", "format_ratio", "reward")}, step)
        if was_training:
            model.train()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0:
            self._run(model, state.global_step)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every != 0:
            self._run(model, state.global_step)

"""Registry/gate inputs with known accuracies: real Puzzle objects, completions built to be
right or wrong on chosen puzzles, written with the project's write_evaluation, and model
folders registered with the project's register()."""

from __future__ import annotations

import json
from pathlib import Path

from helpers.data import TYPES


def make_test_set(n: int = 40, tag: str = "a") -> list:
    """Real puzzles (N = 3..5) built with make_puzzle; ``tag`` makes a different test set."""
    from cellpuzzles.task.puzzle import make_puzzle

    out = []
    for i in range(n):
        k = 3 + i % 3
        types = [TYPES[(i + j) % len(TYPES)] for j in range(k)]
        genes = [[f"GENE{(7 * i + j) % 50:03d}", f"GENE{(3 * j + i) % 50:03d}"] for j in range(k)]
        out.append(make_puzzle(genes, types, {"tissue": "blood", "sex": "female"}, donor_id="d1",
                               cell_ids=[f"{tag}{i}_{j}" for j in range(k)]))
    return out


def write_eval(folder: Path, puzzles: list, right: set[int], ill_formed: set[int] = frozenset(),
               drop: tuple[str, ...] = ()) -> Path:
    """Completions right on ``right``, a wrong permutation elsewhere, ill-formed on ``ill_formed``."""
    from cellpuzzles.evaluation.record import write_evaluation
    from cellpuzzles.task.puzzle import format_completion
    from cellpuzzles.task.reward import score

    comps = []
    for i, p in enumerate(puzzles):
        if i in ill_formed:
            comps.append(" | ".join(p.answer))
        else:
            comps.append(format_completion("markers", p.answer if i in right else [*p.answer[1:], p.answer[0]]))
    m = score(comps, [p.answer_text for p in puzzles], n_boot=50)
    for k in drop:
        m.pop(k)
    write_evaluation(folder, folder.name, puzzles, {"constrained": comps, "free": comps}, {"constrained": m, "free": m})
    return folder


def write_model(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    (folder / "tokenizer.json").write_text("{}")
    (folder / "cellpuzzles.json").write_text(json.dumps({"genes_per_cell": 6}))
    return folder


def add_version(tmp_path: Path, name: str, label: str, puzzles: list, right: set[int], **kw) -> str:
    """Register a new version of ``name`` (on $MLFLOW_TRACKING_URI) right on ``right``."""
    from cellpuzzles.release.registry import register

    return register(write_model(tmp_path / f"m-{label}"), write_eval(tmp_path / f"e-{label}", puzzles, right, **kw),
                    name=name, data_version="md5-test.dir")


def client(server):
    from mlflow.tracking import MlflowClient

    return MlflowClient(server["uri"])


def aliases(c, name) -> dict[str, str]:
    return dict(c.get_registered_model(name).aliases)

"""Small real models for the learning, PPO and serving tests: puzzles from the bundled PBMC
data (or hand-made marker puzzles), markers-teacher traces, an untrained tiny model folder."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

# a tiny Qwen2: fast on one CPU thread, big enough to learn the trace format
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def build_world(root: Path, genes_per_cell: int = 8, train_per_n: int = 20, test_per_n: int = 8) -> dict:
    """Bundled real PBMC data -> puzzles (N = 3..5) -> markers teacher traces -> an untrained
    tiny model. Returns root, splits, teacher, pairs (puzzle, trace) and the model folder."""
    from cellpuzzles.data.bundled import materialise
    from cellpuzzles.data.cells import CellsOptions, build_cells
    from cellpuzzles.data.sample import PuzzleOptions, make_splits
    from cellpuzzles.distill.teachers.markers import MarkersTeacher
    from cellpuzzles.distill.traces import DistillOptions, distill, read_traces
    from cellpuzzles.inference.folder import PromptOptions
    from cellpuzzles.train.tiny import TinyConfig, build_tiny

    cells = build_cells(materialise(root / "data"), CellsOptions(progress=False))
    splits, _ = make_splits(cells, PuzzleOptions(n_max=5, train_per_n=train_per_n, test_per_n=test_per_n,
                                                 reasoning_fraction=0.5))
    teacher = MarkersTeacher(splits["train"] + splits["reasoning"])
    distill(splits["reasoning"], teacher, DistillOptions(), root / "traces.jsonl")
    pairs = read_traces(root / "traces.jsonl")
    folder = build_tiny([p for p, _ in pairs], [t for _, t in pairs], root / "model", TinyConfig(**SMALL),
                        PromptOptions(genes_per_cell=genes_per_cell))
    return {"root": root, "splits": splits, "teacher": teacher, "pairs": pairs, "folder": folder}


MARKERS = {"B cell": ["CD79A", "MS4A1"], "T cell": ["CD3E", "IL7R"], "NK cell": ["NKG7", "GNLY"],
           "monocyte": ["LYZ", "CD14"]}


def marker_puzzles(k: int = 8) -> list:
    """k three-cell puzzles whose cells carry their type's two marker genes (and one noise gene)."""
    from cellpuzzles.task.puzzle import make_puzzle

    rng = random.Random(0)
    out = []
    for j in range(k):
        types = rng.sample(sorted(MARKERS), 3)
        out.append(make_puzzle([MARKERS[t] + [f"G{j}"] for t in types], types, "Free text context.", donor_id="d",
                               cell_ids=[f"c{j}_{i}" for i in range(3)]))
    return out


def tiny_from_puzzles(puzzles: list, train: list, folder: Path) -> Path:
    """An untrained tiny model folder whose vocabulary covers ``puzzles`` and their traces from
    a markers teacher that knows ``train``."""
    from cellpuzzles.distill.teachers.markers import MarkersTeacher
    from cellpuzzles.inference.folder import PromptOptions
    from cellpuzzles.train.tiny import TinyConfig, build_tiny

    teacher = MarkersTeacher(train)
    traces = [teacher.trace(p) for p in puzzles]
    return build_tiny(puzzles, traces, folder, TinyConfig(**SMALL), PromptOptions())


def as_scaffold_model(src: Path, dest: Path, genes_per_cell: int | None, restated_genes: int) -> Path:
    """A copy of the model folder ``src`` marked as trained on scaffold traces restating
    ``restated_genes`` genes per cell (so decoding and rollouts use the scaffold)."""
    shutil.copytree(src, dest)
    saved = json.loads((src / "cellpuzzles.json").read_text()) if (src / "cellpuzzles.json").is_file() else {}
    (dest / "cellpuzzles.json").write_text(json.dumps({**saved, "genes_per_cell": genes_per_cell,
                                                       "restated_genes": restated_genes}))
    return dest


def assert_loads_as_saved(folder: Path, like: Path):
    """load_model(folder) gives exactly the weights saved in folder/model.safetensors, in a model
    with as many parameters as the one in ``like``; returns the loaded model."""
    import torch
    from safetensors.torch import load_file

    from cellpuzzles.inference.folder import load_model

    model, _, _ = load_model(folder)
    saved = load_file(folder / "model.safetensors")
    state = model.state_dict()
    assert saved and set(saved) <= set(state), set(saved) - set(state)
    for k, v in saved.items():
        assert torch.equal(state[k].to(v.dtype), v), f"{folder}: {k} differs from the saved tensor"
    assert model.num_parameters() == load_model(like)[0].num_parameters()
    return model

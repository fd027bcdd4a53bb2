"""Benchmark: constrained decoding of puzzles whose cell-type names span several tokens.

The production-shaped model (tests/helpers/production.py: byte-level BPE saved as
Qwen2Tokenizer, Qwen2.5-Instruct's chat template, a small random Qwen2), marked as trained on
scaffold traces, decodes the same test puzzles two ways in the same run:

* baseline: the per-puzzle path the project used for multi-token names before the batched
  one (copied below as ``old_constrained``: one puzzle at a time, one forward per slot over a
  copied KV cache, each candidate scored as ``prefix + candidate`` is tokenized);
* project: ``decode.constrained_many`` (``inference/slot_batch.py``: all puzzles of a batch and
  all candidates of a slot in one forward pass over a shared KV cache with the candidates'
  token trie, each candidate scored as the tokenizer encodes it in the finished text).

Prints puzzles/s for both (CPU seconds of this process with one torch thread, so other work
on a shared machine does not decide the figure; wall seconds beside; both paths warmed up alike,
timed ``--repeat`` times in alternating order, each path's best run kept), the ratio, and how many
puzzles get the same answer. Where no name merges with the text after it, both paths score the
same tokens and must agree; where one does (``'CD34+'`` then a newline: ``'+Ċ'``), the old path
scored the non-canonical ``'+'`` and no separator, the new one the canonical tokens through the
separator for every candidate, so answers of an untrained model (near-tied scores) differ.

    python benchmarks/constrained_bpe.py [--puzzles 48] [--batch 32] [--genes 8] [--restated 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

TARGET = 5.0


def old_constrained(model, tok, puzzle, k: int) -> str:
    """The per-puzzle scaffold decoding as it was (decode._scaffolded + _greedy_slots)."""
    from cellpuzzles.inference.decode import PrefixCache, slot_scores
    from cellpuzzles.inference.prompting import prompt_text
    from cellpuzzles.task.assign import assign_labels
    from cellpuzzles.task.puzzle import format_completion
    from cellpuzzles.task.scaffold import cell_line, think_lines

    base = prompt_text(tok, puzzle) + "<think>"
    scores = np.zeros((puzzle.n, puzzle.n))
    chosen: list[str] = []
    state = PrefixCache(model)
    for i in range(puzzle.n):
        done = think_lines(puzzle, k, chosen)
        prefix = base + (done + "\n" if done else "") + cell_line(i, puzzle.genes[i], k)
        scores[i] = slot_scores(model, tok, prefix, puzzle.candidates, state)
        free = [j for j in np.argsort(-scores[i]) if puzzle.candidates[j] not in chosen]
        chosen.append(puzzle.candidates[free[0]])
        state.commit(free[0])
    labels = assign_labels(scores, puzzle.candidates)
    return format_completion(think_lines(puzzle, k, labels), labels)


def _merges(tok, puzzle) -> bool:
    """Whether a candidate's last token merges with the newline after it (``'+Ċ'``): then every
    candidate is scored through the separator's token, which the old path never scored."""
    from cellpuzzles.inference.slot_tails import slot_tails

    _, tails, _ = slot_tails(tok, "Cell 1: A -> ", puzzle.candidates, "\nCell 2: ")
    return any(tok.decode(t).endswith("\n") for t in tails)


def build(root: Path, genes: int, restated: int, per_n: int):
    """Bundled PBMC data -> puzzles of N = 3..10 -> markers-teacher traces -> the
    production-shaped model (tokenizer learnt from them), marked as a scaffold model."""
    from cellpuzzles.data.bundled import materialise
    from cellpuzzles.data.cells import CellsOptions, build_cells
    from cellpuzzles.data.sample import PuzzleOptions, make_splits
    from cellpuzzles.distill.teachers.markers import MarkersTeacher

    from helpers.models import as_scaffold_model
    from helpers.production import build_production_model

    cells = build_cells(materialise(root / "data"), CellsOptions(progress=False))
    splits, _ = make_splits(cells, PuzzleOptions(n_min=3, n_max=10, train_per_n=per_n, test_per_n=per_n))
    teacher = MarkersTeacher(splits["train"] + splits["reasoning"])
    pairs = [(p, teacher.trace(p)) for p in splits["reasoning"]]
    prod = build_production_model([p for p, _ in pairs], [t for _, t in pairs], root / "prod", genes_per_cell=genes)
    return splits, as_scaffold_model(prod, root / "prod-scaffold", genes_per_cell=genes, restated_genes=restated)


def main(argv=None) -> int:
    import torch

    from cellpuzzles.inference.decode import constrained_many
    from cellpuzzles.inference.folder import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--puzzles", type=int, default=48)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--genes", type=int, default=8)
    ap.add_argument("--restated", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3, help="timed runs of each path (best kept)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as d:
        splits, folder = build(Path(d), a.genes, a.restated, max(4, a.puzzles // 8 + 1))
        model, tok, prompt = load_model(folder)
        test = splits["test"]
        # spread over the test split (N = 3..10 alike), not its first puzzles
        puzzles = [prompt.apply(test[i * len(test) // a.puzzles]) for i in range(min(a.puzzles, len(test)))]
        names = sorted({c for p in puzzles for c in p.candidates})
        toks = [len(tok(" " + c, add_special_tokens=False)["input_ids"]) for c in names]
        print(f"{len(puzzles)} puzzles (N {min(p.n for p in puzzles)}-{max(p.n for p in puzzles)}), "
              f"{len(names)} names of {min(toks)}-{max(toks)} tokens, model {model.num_parameters() / 1e6:.2f}M "
              f"parameters, {a.threads} thread(s)", flush=True)
        run_new = lambda ps: constrained_many(model, tok, ps, [""] * len(ps), a.restated, batch_size=a.batch)  # noqa: E731
        run_old = lambda ps: [old_constrained(model, tok, p, a.restated) for p in ps]  # noqa: E731
        run_new(puzzles[:2]), run_old(puzzles[:2])  # warm-up, both paths alike
        times, answers = {"new": [], "old": []}, {}
        for r in range(a.repeat):  # alternate which path goes first; keep each path's best (least disturbed) run
            for key, fn in (("new", run_new), ("old", run_old))[:: 1 if r % 2 == 0 else -1]:
                c, w = time.process_time(), time.perf_counter()
                answers[key] = fn(puzzles)
                times[key].append((time.process_time() - c, time.perf_counter() - w))
        new, old = answers["new"], answers["old"]
        (new_cpu, new_wall), (old_cpu, old_wall) = min(times["new"]), min(times["old"])
        merged = [_merges(tok, p) for p in puzzles]
    n = len(puzzles)
    print(f"baseline (per puzzle, KV-cache copies): {n / old_cpu:8.2f} puzzles/s ({old_cpu:.1f} CPU s; wall {old_wall:.1f} s)")
    print(f"project  (batched, candidate trie):     {n / new_cpu:8.2f} puzzles/s ({new_cpu:.1f} CPU s; wall {new_wall:.1f} s)")
    print(f"ratio {old_cpu / new_cpu:.1f}x in CPU time (target >= {TARGET:.0f}x; wall {old_wall / new_wall:.1f}x)")
    for label, want in (("no name merges with the text after it", False), ("a name merges with the newline", True)):
        idx = [i for i in range(n) if merged[i] == want]
        same = sum(new[i] == old[i] for i in idx)
        print(f"same answer on {same}/{len(idx)} puzzles where {label}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`cellpuzzles prepare | validate | cells | puzzles | synth`: the data stage's commands."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cellpuzzles.core.errors import ValidationFailed


def _cells_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--map", action="append", default=[], metavar="FIELD=COLUMN",
                   help="obs column holding a CELLxGENE field, e.g. --map cell_type=bulk_labels (repeatable)")
    p.add_argument("--top-k", type=int, default=50, help="genes listed per cell (default 50, as the reference)")
    p.add_argument("--exclude", action="append", default=[], metavar="REGEX",
                   help="drop genes matching this regex from the lists, e.g. '^MT-' (repeatable; off by default)")
    p.add_argument("--chunk-size", type=int, default=10_000, help="cells per chunk when streaming the matrix")


def _cells_options(a):
    from cellpuzzles.data.cells import CellsOptions
    from cellpuzzles.data.h5ad import parse_column_map

    return CellsOptions(top_k=a.top_k, exclude=tuple(a.exclude), chunk_size=a.chunk_size,
                        column_map=parse_column_map(a.map), progress=sys.stderr.isatty())


def _puzzle_args(p: argparse.ArgumentParser) -> None:
    from cellpuzzles.data.options import PuzzleOptions

    d = PuzzleOptions()
    p.add_argument("--n-min", type=int, default=d.n_min, help=f"smallest puzzle size N (default {d.n_min})")
    p.add_argument("--n-max", type=int, default=d.n_max,
                   help=f"largest puzzle size N (default {d.n_max}; sizes above the data's type count are skipped)")
    p.add_argument("--train-per-n", type=int, default=d.train_per_n, help=f"train puzzles per N (default {d.train_per_n})")
    p.add_argument("--test-per-n", type=int, default=d.test_per_n, help=f"test puzzles per N (default {d.test_per_n})")
    p.add_argument("--split-by", choices=["cells", "donor"], default=d.split_by, help="hold out cells (default) or whole donors")
    p.add_argument("--test-fraction", type=float, default=d.test_fraction,
                   help=f"share of cells/donors held out (default {d.test_fraction})")
    p.add_argument("--reasoning-fraction", type=float, default=d.reasoning_fraction,
                   help=f"share of train puzzles moved to a reasoning (SFT) split (default {d.reasoning_fraction})")
    p.add_argument("--seed", type=int, default=d.seed)


def _puzzle_options(a):
    from cellpuzzles.data.options import PuzzleOptions

    return PuzzleOptions(n_min=a.n_min, n_max=a.n_max, train_per_n=a.train_per_n, test_per_n=a.test_per_n,
                         split_by=a.split_by, test_fraction=a.test_fraction,
                         reasoning_fraction=a.reasoning_fraction, seed=a.seed)


def cmd_prepare(a) -> int:
    from cellpuzzles.data.bundled import materialise
    from cellpuzzles.data.versioning import sync_cache

    path = materialise(a.dir)
    print(f"wrote {path} (scanpy pbmc68k_reduced, CELLxGENE-style columns)")
    state = sync_cache(".", Path(a.dir).name) if Path(a.dir).resolve().parent == Path.cwd().resolve() else "untracked"
    if state == "matches":
        print(f"{a.dir}/ matches {Path(a.dir).name}.dvc; cached locally (`dvc status` is clean)")
    elif state == "differs":
        print(f"warning: {a.dir}/ differs from {Path(a.dir).name}.dvc (other package versions?); "
              f"`dvc add {a.dir}` records this version", file=sys.stderr)
    else:
        print(f"not under DVC here; track it with `dvc add {a.dir}`")
    return 0


def cmd_validate(a) -> int:
    from cellpuzzles.data.cells import build_cells
    from cellpuzzles.data.validate import validate_cells

    cells = build_cells(a.file, _cells_options(a))
    report = validate_cells(cells, a.out)
    print(report.table())
    print(f"data docs: {report.docs_index}\nsummary:   {Path(a.out) / 'validation.json'}")
    if not report.success:
        raise ValidationFailed(f"{a.file}: {len(report.failed)} expectation(s) failed: " + "; ".join(report.failed))
    return 0


def cmd_cells(a) -> int:
    from cellpuzzles.data.cells import build_cells

    cells = build_cells(a.file, _cells_options(a))
    cells.to_parquet(a.out)
    print(f"wrote {a.out}: {len(cells):,} cells, top {cells.meta['top_k']} genes from {cells.meta['matrix']}")
    return 0


def cmd_puzzles(a) -> int:
    from cellpuzzles.data.cells import load_cells
    from cellpuzzles.data.sample import make_splits, write_splits
    from cellpuzzles.data.validate import validate_cells

    out = Path(a.out)
    (out / "summary.json").unlink(missing_ok=True)  # the completion marker: gone until this run succeeds
    cells = load_cells(a.file, _cells_options(a))
    if not a.no_validate and Path(a.file).suffix != ".parquet":
        report = validate_cells(cells, out / "validation")
        if not report.success:
            print(report.table())  # stdout: stderr carries only the one-line error
            raise ValidationFailed(f"{a.file}: {len(report.failed)} expectation(s) failed: " + "; ".join(report.failed))
    splits, summary = make_splits(cells, _puzzle_options(a))
    if a.cells_out:
        cells.to_parquet(a.cells_out)
    write_splits(out, splits, summary)
    _print_split_summary(summary, out)
    return 0


def _print_split_summary(summary: dict, out: Path) -> None:
    ns = summary["n_values"]
    print(f"{'split':<10}{'puzzles':>8}{'cells':>8}  " + " ".join(f"N={n:<4}" for n in ns))
    for name, s in summary["splits"].items():
        print(f"{name:<10}{s['puzzles']:>8}{s['cells']:>8}  " + " ".join(f"{s['by_n'].get(n, 0):<6}" for n in ns))
    if summary["skipped_n"]:
        print(f"skipped N (more types than any donor has): {summary['skipped_n']}")
    names = list(summary["splits"])
    donors = sorted({d for sp in summary["splits"].values() for d in sp["by_donor"]})
    print(f"{'donor':<24}" + "".join(f"{n:>10}" for n in names))
    for d in donors[:20]:
        print(f"{d[:23]:<24}" + "".join(f"{summary['splits'][n]['by_donor'].get(d, 0):>10}" for n in names))
    if len(donors) > 20:
        print(f"... {len(donors) - 20} more donors in summary.json")
    print(f"wrote {', '.join(str(out / f) for f in ['summary.json', *[s + '.jsonl' for s in summary['splits']]])}")


def cmd_synth(a) -> int:
    from cellpuzzles.data.synth import synthesize

    info = synthesize(a.out, cells=a.cells, genes=a.genes, donors=a.donors, types=a.types,
                      seed=a.seed, density=a.density)
    print(f"wrote {a.out}: " + ", ".join(f"{k} {v}" for k, v in info.items() if k != "path"))
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("prepare", help="materialise the bundled real dataset into data/ (no network)")
    p.add_argument("--dir", default="data")
    p.set_defaults(fn=cmd_prepare)

    p = sub.add_parser("validate", help="run the data validation suite on an .h5ad; HTML data docs + JSON summary")
    p.add_argument("file")
    p.add_argument("--out", default="runs/validation", help="folder for data docs and validation.json (default runs/validation)")
    _cells_args(p)
    p.set_defaults(fn=cmd_validate)

    p = sub.add_parser("cells", help="write the cells table (Parquet) from an .h5ad")
    p.add_argument("file")
    p.add_argument("--out", required=True, help="output .parquet path")
    _cells_args(p)
    p.set_defaults(fn=cmd_cells)

    p = sub.add_parser("puzzles", help="sample CellPuzzles train/test(/reasoning) splits from an .h5ad or cells table")
    p.add_argument("file", help=".h5ad file or cells .parquet")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--cells-out", default=None, help="also write the cells table to this .parquet")
    p.add_argument("--no-validate", action="store_true", help="skip the validation suite")
    _cells_args(p)
    _puzzle_args(p)
    p.set_defaults(fn=cmd_puzzles)

    p = sub.add_parser("synth", help="write a synthetic CELLxGENE-schema .h5ad (donors, context, markers, sparsity)")
    p.add_argument("--cells", type=int, default=5000)
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--donors", type=int, default=4)
    p.add_argument("--types", type=int, default=10)
    p.add_argument("--density", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_synth)

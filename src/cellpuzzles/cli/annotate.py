"""`cellpuzzles annotate FILE.h5ad --groupby COL --candidates ... (--model FOLDER | --endpoint URL) --out DIR`:
label an analyst's own groups; writes the annotated .h5ad, the per-group table (CSV) and the plots."""

from __future__ import annotations

from pathlib import Path

from cellpuzzles.annotate.options import AnnotateOptions
from cellpuzzles.core.options import add_arguments, from_args

KEY_ADDED = "cellpuzzles_type"
PRINTED = ["group", "donor", "n_cells", "assigned_type", "status", "puzzle"]


def read_candidates(text: str) -> list[str]:
    """A file with one type per line, or a comma-separated list."""
    from cellpuzzles.core.errors import CellPuzzlesError

    p = Path(text)
    if p.is_file():
        return [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if p.suffix in (".txt", ".csv", ".tsv") and "," not in text:
        raise CellPuzzlesError(f"--candidates {text}: file not found; give a file with one type per line or A,B,C")
    return text.split(",")


def cmd_annotate(a) -> int:
    import anndata as ad

    from cellpuzzles.annotate.api import annotate
    from cellpuzzles.core import atomic
    from cellpuzzles.core.errors import CellPuzzlesError, short_reason
    from cellpuzzles.data.h5ad import parse_column_map

    if (a.model is None) == (a.endpoint is None):
        raise CellPuzzlesError("give exactly one of --model FOLDER or --endpoint URL")
    src = Path(a.file)
    if not src.is_file():
        raise CellPuzzlesError(f"{src}: file not found; check the path")
    column_map = parse_column_map(a.map)
    candidates = read_candidates(a.candidates)
    try:
        adata = ad.read_h5ad(src)
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise CellPuzzlesError(f"{src}: not a readable .h5ad ({short_reason(e)}); pass an .h5ad written by anndata") from None
    opt = from_args(AnnotateOptions, a)
    result = annotate(adata, candidates, model=a.model, endpoint=a.endpoint, column_map=column_map, options=opt)
    out = Path(a.out)
    # everything is computed; now the files, each written atomically
    h5 = out / f"{src.stem}.annotated.h5ad"
    result.to_adata(KEY_ADDED)
    with atomic.atomic_path(h5) as tmp:
        adata.write_h5ad(tmp)
    csv = result.to_csv(out / "groups.csv")
    plots = result.to_plots(out / "plots", KEY_ADDED)
    import pandas as pd

    with pd.option_context("display.width", 160, "display.max_columns", 20, "display.max_colwidth", 40):
        print(result.table[PRINTED].to_string(index=False))
    for note in result.notes:
        print(f"note: {note}")
    failed = int((result.table["status"] != "ok").sum())
    print(f"assignment: {result.params['assignment']}; {len(result.table) - failed}/{len(result.table)} groups annotated"
          + (f", {failed} failed (see status in the table)" if failed else ""))
    for p in (h5, csv, *plots):
        print(f"wrote {p}")
    return 1 if failed else 0


def add_commands(sub) -> None:
    p = sub.add_parser("annotate", help="label your own clusters (scanpy .h5ad) with a trained model or the endpoint")
    p.add_argument("file", metavar="FILE.h5ad", help="the AnnData file with the groups (clusters) in obs")
    p.add_argument("--candidates", required=True, help="candidate types: a file with one per line, or A,B,C")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", default=None, help="a trained model folder (decoded here)")
    src.add_argument("--endpoint", default=None,
                     help="`cellpuzzles serve` base URL (V1 route; token from $CELLPUZZLES_API_TOKEN)")
    p.add_argument("--map", action="append", default=[], metavar="FIELD=COLUMN",
                   help="obs column holding a donor field, e.g. --map sex=gender (repeatable)")
    p.add_argument("--out", required=True, help="output folder: FILE.annotated.h5ad, groups.csv, plots/")
    add_arguments(p, AnnotateOptions)
    p.set_defaults(fn=cmd_annotate)

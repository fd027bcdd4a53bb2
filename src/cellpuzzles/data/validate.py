"""The data validation suite (Great Expectations) over the cells table, the matrix stats,
the gene vocabulary and the donors.

Three tables are checked:
  cells   one row per cell: ids, labels, context, and per-cell matrix stats
          (min stored value, count of non-finite values) from the streaming pass;
  genes   the gene symbols of the chosen matrix;
  donors  one row per puzzle group (donor, or donor+batch): how many types and cells.
Donors with fewer than 3 types cannot host a puzzle; they are listed as unusable in the
report, and the suite fails only when no donor is usable.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from cellpuzzles.core import atomic
from cellpuzzles.data.cells import Cells
from cellpuzzles.data.h5ad import CONTEXT, REQUIRED

MIN_TYPES = 3
LABEL_COLUMNS = ("donor_id", "cell_type")


def group_key(obs: pd.DataFrame) -> pd.Series:
    """The puzzle group of each cell: its donor, or donor + batch when a batch column exists."""
    donor = obs["donor_id"].astype(object)
    if "batch" in obs.columns:
        return donor.astype(str) + " / " + obs["batch"].astype(str)
    return donor


def donor_table(obs: pd.DataFrame) -> pd.DataFrame:
    ok = obs["donor_id"].notna() & obs["cell_type"].notna()
    sub = obs[ok]
    g = sub.groupby(group_key(sub), sort=True)
    return pd.DataFrame({"n_types": g["cell_type"].nunique(), "n_cells": g.size()}).rename_axis("group").reset_index()


def _suites() -> dict[str, list]:
    import great_expectations.expectations as gxe  # slow import (measured: docs/data.md): only when validating

    cells = [gxe.ExpectColumnToExist(column=c) for c in ("cell_id", *REQUIRED, *CONTEXT)]
    cells += [gxe.ExpectColumnValuesToNotBeNull(column=c) for c in ("cell_id", *REQUIRED)]
    cells += [gxe.ExpectColumnValuesToBeUnique(column="cell_id")]
    for c in LABEL_COLUMNS:
        cells += [
            gxe.ExpectColumnValuesToNotMatchRegex(column=c, regex=r"^\s*$"),  # empty / whitespace only
            gxe.ExpectColumnValuesToNotMatchRegex(column=c, regex=r"^\s|\s$"),  # stray whitespace
        ]
    # '|' and line breaks would corrupt the answer string "A | B | C"
    cells += [gxe.ExpectColumnValuesToNotMatchRegex(column="cell_type", regex=r"[|\n\r]")]
    cells += [
        gxe.ExpectColumnMaxToBeBetween(column="n_nonfinite", max_value=0),  # counts finite
        gxe.ExpectColumnMinToBeBetween(column="min_value", min_value=0),  # counts non-negative
    ]
    genes = [
        gxe.ExpectColumnValuesToNotBeNull(column="gene"),
        gxe.ExpectColumnValuesToNotMatchRegex(column="gene", regex=r"^\s*$"),
        gxe.ExpectColumnValuesToBeUnique(column="gene"),
    ]
    donors = [
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
        gxe.ExpectColumnMaxToBeBetween(column="n_types", min_value=MIN_TYPES),
    ]
    return {"cells": cells, "genes": genes, "donors": donors}


@dataclass
class ValidationReport:
    success: bool
    failed: list[str]
    results: list[dict]
    summary: dict
    docs_index: Path | None = None
    unusable: list[dict] = field(default_factory=list)

    def table(self) -> str:
        s = self.summary
        lines = [
            f"cells {s['cells']:,}  genes {s['genes']:,}  types {s['types']}  groups {s['groups']} "
            f"({s['usable_groups']} usable, {len(self.unusable)} with < {MIN_TYPES} types)  matrix {s['matrix']}",
        ]
        passed = sum(r["success"] for r in self.results)
        lines.append(f"expectations: {passed}/{len(self.results)} passed" + ("" if self.success else "; failed:"))
        lines += [f"  FAIL {r['name']}  {r['detail']}" for r in self.results if not r["success"]]
        for u in self.unusable[:10]:
            lines.append(f"  unusable group {u['group']!r}: {u['n_types']} type(s), {u['n_cells']} cell(s)")
        return "\n".join(lines)


def _describe(table: str, er) -> dict:
    cfg = er.expectation_config
    kw = {k: v for k, v in cfg.kwargs.items() if k not in ("batch_id",)}
    col = kw.pop("column", None)
    args = ", ".join([*( [col] if col else []), *(f"{k}={v!r}" for k, v in kw.items() if v is not None)])
    res = er.result or {}
    detail = ""
    if res.get("unexpected_count"):
        ex = [x for x in (res.get("partial_unexpected_list") or [])[:3]]
        detail = f"{res['unexpected_count']} unexpected, e.g. {ex!r}"
    elif res.get("observed_value") is not None:
        obs = res["observed_value"]
        detail = f"observed {obs.item() if hasattr(obs, 'item') else obs!r}"
    elif not er.success:
        detail = "column missing" if cfg.type == "expect_column_to_exist" else "failed"
    return {"table": table, "name": f"{table}.{cfg.type}({args})", "success": bool(er.success), "detail": detail}


def validate_cells(cells: Cells, out_dir: str | os.PathLike, gene_names=None) -> ValidationReport:
    """Run the suite; write HTML data docs and ``validation.json`` under ``out_dir``."""
    import great_expectations as gx  # slow import (measured: docs/data.md): only when validating

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    obs = cells.obs
    genes = gene_names if gene_names is not None else cells.genes
    frames = {
        "cells": obs,
        "genes": pd.DataFrame({"gene": pd.Series(list(genes), dtype=object)}),
        "donors": donor_table(obs) if {"donor_id", "cell_type"} <= set(obs.columns) else pd.DataFrame({"n_types": []}),
    }
    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    docs_tmp = Path(tempfile.mkdtemp(prefix=".data_docs.", dir=out_dir)).resolve()
    try:
        ctx = gx.get_context(mode="ephemeral")
        ctx.variables.progress_bars = gx.data_context.types.base.ProgressBarsConfig(globally=False)
        ctx.add_data_docs_site(
            site_name="cellpuzzles",
            site_config={
                "class_name": "SiteBuilder",
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_tmp)},
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            },
        )
        source = ctx.data_sources.add_pandas("cellpuzzles")
        results: list[dict] = []
        for name, expectations in _suites().items():
            batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("all")
            suite = ctx.suites.add(gx.ExpectationSuite(name=name))
            for e in expectations:
                suite.add_expectation(e)
            vd = ctx.validation_definitions.add(gx.ValidationDefinition(data=batch, suite=suite, name=name))
            cp = ctx.checkpoints.add(
                gx.Checkpoint(
                    name=f"{name}_checkpoint",
                    validation_definitions=[vd],
                    actions=[gx.checkpoint.UpdateDataDocsAction(name="docs", site_names=["cellpuzzles"])],
                )
            )
            run = cp.run(batch_parameters={"dataframe": frames[name]})
            for vr in run.run_results.values():
                results += [_describe(name, er) for er in vr.results]
        final_docs = out_dir / "data_docs"
        shutil.rmtree(final_docs, ignore_errors=True)
        os.replace(docs_tmp, final_docs)
    finally:
        shutil.rmtree(docs_tmp, ignore_errors=True)

    donors = frames["donors"]
    unusable = donors[donors["n_types"] < MIN_TYPES].to_dict("records") if len(donors) else []
    failed = [f"{r['name']}: {r['detail']}" for r in results if not r["success"]]
    summary = {
        "source": cells.meta.get("source"),
        "matrix": cells.meta.get("matrix"),
        "cells": int(len(obs)),
        "genes": int(len(genes)),
        "types": int(obs["cell_type"].nunique()) if "cell_type" in obs else 0,
        "groups": int(len(donors)),
        "usable_groups": int((donors["n_types"] >= MIN_TYPES).sum()) if len(donors) else 0,
        "unusable_groups": [{k: (int(v) if k != "group" else str(v)) for k, v in u.items()} for u in unusable],
        "success": not failed,
        "failed": failed,
        "expectations": results,
        "data_docs": str(final_docs / "index.html"),
    }
    atomic.write_json(out_dir / "validation.json", summary)
    return ValidationReport(
        success=not failed, failed=failed, results=results, summary=summary,
        docs_index=final_docs / "index.html", unusable=summary["unusable_groups"],
    )

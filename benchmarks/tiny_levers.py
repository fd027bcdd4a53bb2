"""Which lever closes the tiny default's gap to the ceiling of its input? (across split seeds)

For each finished `cellpuzzles run` given, retrains SFT on that run's own distilled traces
with each ``--variant`` (``key=value[,key=value]``: a field of ``SFTOptions``, e.g.
``max_steps=600`` or ``weight_decay=0.1``, of ``TinyConfig``, e.g. ``hidden_size=256`` or
``marker_norm=1.0``, or ``genes_per_cell``; everything else the pipeline's defaults and the
run's seed), decodes the run's test puzzles constrained, and prints batch and cell accuracy
beside the run's own SFT model (the baseline of the ratio, read from its `summary.json`) and
the classifier shown the same genes (`ceiling_topK`, the ceiling of the model's input). A
variant that changes only SFT options starts from the run's own untrained start
(`sft/start`); one that changes the model's build rebuilds the start from the same traces and
seed; ``genes_per_cell=K`` first distills new traces from the run's puzzles as the pipeline's
distill step does for a student shown K genes (``distill_step``), then builds the start with
K genes per cell. One line per run and variant, then the mean over runs.

Choosing a default on seeds whose test puzzles are printed here is tuning on those seeds'
test sets: pick on some seeds, confirm on others (the closing note says which).

    python benchmarks/tiny_levers.py --run runs/seed0 runs/seed1 --variant max_steps=600 \
        --variant weight_decay=0.1 --variant hidden_size=256,intermediate_size=768
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import fields, replace
from pathlib import Path

GENES = "genes_per_cell"


def run_parts(run: Path) -> dict:
    """The pieces of a finished run this benchmark needs (newest pipeline folder)."""
    summary = json.loads((run / "summary.json").read_text())
    pipe = Path(summary["pipeline"]["folder"])
    return {"start": pipe / "sft" / "start", "traces": pipe / "distill" / "traces" / "traces.jsonl",
            "puzzles": pipe / "puzzles" / "puzzle_set", "test": pipe / "puzzles" / "puzzle_set" / "test.jsonl",
            "summary": summary}


def parse_variant(text: str) -> tuple[dict, dict, int | None]:
    """``key=value,...`` split into (SFTOptions changes, TinyConfig changes, genes per cell or
    None); values read as JSON (numbers, booleans) by the project's own KEY=VALUE parser."""
    from cellpuzzles.core.options import parse_key_value
    from cellpuzzles.train.sft import SFTOptions
    from cellpuzzles.train.tiny import TinyConfig

    sft_names, tiny_names = {f.name for f in fields(SFTOptions)}, {f.name for f in fields(TinyConfig)}
    sft_kw, tiny_kw, genes = {}, {}, None
    for item in filter(None, text.split(",")):
        key, value = parse_key_value(item, "--variant", "max_steps=600", json_values=True)
        if key == GENES:
            genes = int(value)
        elif key in sft_names - {"seed"}:
            sft_kw[key] = value
        elif key in tiny_names - {"seed"}:
            tiny_kw[key] = value
        else:
            raise SystemExit(f"--variant {text}: {key!r} is not an SFTOptions or TinyConfig field or {GENES}")
    return sft_kw, tiny_kw, genes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", nargs="+", required=True, type=Path, help="output folders of `cellpuzzles run`")
    ap.add_argument("--variant", action="append", required=True, help="key=value[,key=value] (repeatable)")
    a = ap.parse_args(argv)
    variants = [(v, *parse_variant(v)) for v in a.variant]

    import torch

    from cellpuzzles.core.options import build
    from cellpuzzles.distill.traces import read_traces
    from cellpuzzles.evaluation.evaluate import evaluate_model, load_split_dir
    from cellpuzzles.evaluation.peers import ceiling_completions, ceiling_name
    from cellpuzzles.inference.folder import load_prompt_options
    from cellpuzzles.pipelines.report import batch_accuracy
    from cellpuzzles.steps.learning import DistillStepOptions, SFTStepOptions, distill_step
    from cellpuzzles.task.puzzle import read_puzzles
    from cellpuzzles.task.reward import score
    from cellpuzzles.train.sft import SFTOptions, sft
    from cellpuzzles.train.tiny import TinyConfig, build_tiny

    torch.set_num_threads(2)
    shown = SFTStepOptions().genes_per_cell  # the tiny default's view, the runs' own
    table: dict[str, list[float]] = {v: [] for v, *_ in variants}
    base_all, ceil_all = [], []
    for run in a.run:
        parts = run_parts(run)
        seed = int(parts["summary"]["seed"])
        base, ceiling = batch_accuracy(parts["summary"], "sft"), batch_accuracy(parts["summary"], ceiling_name(shown))
        base_all.append(base)
        ceil_all.append(ceiling)
        pairs, test = read_traces(parts["traces"]), read_puzzles(parts["test"])
        print(f"{run}: seed {seed}, default SFT {base:.3f}, {ceiling_name(shown)} {ceiling:.3f}", flush=True)
        for name, sft_kw, tiny_kw, genes in variants:
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory() as d:
                start, prompt, used, ceil = parts["start"], load_prompt_options(parts["start"]), pairs, ceiling
                if genes is not None:  # the pipeline's traces for a student shown that many genes
                    distill_step(parts["puzzles"], Path(d) / "distill", DistillStepOptions(visible_genes=genes))
                    used, prompt = read_traces(Path(d) / "distill" / "traces.jsonl"), replace(prompt, genes_per_cell=genes)
                    train, _ = load_split_dir(parts["puzzles"])
                    ceil = score(ceiling_completions(train, test, genes), [p.answer_text for p in test],
                                 n_boot=0)["batch_accuracy"]
                if tiny_kw or genes is not None:
                    start = build_tiny([p for p, _ in used], [t for _, t in used], Path(d) / "start",
                                       build(TinyConfig, tiny_kw, seed=seed), prompt)
                out = sft(used, start, Path(d) / "sft", build(SFTOptions, sft_kw, seed=seed))
                r = evaluate_model(out, test, modes=("constrained",), seed=seed)["constrained"]
            table[name].append(r["batch_accuracy"])
            ratio = f"{r['batch_accuracy'] / base:.2f}x the default's" if base else "default scored 0"
            print(f"  {name}: batch accuracy {r['batch_accuracy']:.3f} ({ratio}; {ceiling_name(genes or shown)} {ceil:.3f}), "
                  f"cell accuracy {r['cell_accuracy']:.3f}, {time.perf_counter() - t0:.0f} s", flush=True)
    n = len(a.run)
    print(f"mean over {n} runs: default SFT {sum(base_all) / n:.3f}, {ceiling_name(shown)} {sum(ceil_all) / n:.3f}")
    for name, accs in table.items():
        print(f"mean over {n} runs: {name} {sum(accs) / n:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

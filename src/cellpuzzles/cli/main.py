"""The ``cellpuzzles`` command line. Each command calls one library function."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cellpuzzles.core.errors import CellPuzzlesError, ValidationFailed
from cellpuzzles.core.options import add_arguments, from_args, parse_key_value


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


def cmd_evaluate(a) -> int:
    from cellpuzzles.evaluation.evaluate import (
        evaluate_solver,
        load_split_dir,
        read_predictions,
        score_predictions,
    )
    from cellpuzzles.task.puzzle import read_puzzles
    from cellpuzzles.task.reward import format_by_n, format_table

    src = Path(a.puzzles)
    if a.model:
        from cellpuzzles.evaluation.evaluate import evaluate_model
        from cellpuzzles.inference.decode import DecodeOptions

        test = read_puzzles(src / "test.jsonl" if src.is_dir() else src)
        dec = DecodeOptions(do_sample=a.do_sample, temperature=a.temperature, max_new_tokens=a.max_new_tokens, seed=a.seed)
        res = evaluate_model(a.model, test, a.out, modes=a.mode or ["free", "constrained"], decode=dec,
                             name=Path(a.model).name, seed=a.seed)
        print(format_table(res))
        for mode, r in res.items():
            print(f"\n{mode} by N:\n{format_by_n(r)}")
        return 0
    if a.solver and a.predictions:
        raise CellPuzzlesError("give either --predictions or --solver, not both")
    if a.solver:
        if src.is_dir():
            train, test = load_split_dir(src)
        else:
            if not a.train:
                raise CellPuzzlesError("--solver with a puzzle file needs --train TRAIN.jsonl (the solver learns from it)")
            train, test = read_puzzles(a.train), read_puzzles(src)
        names = a.solver
        results = {n: evaluate_solver(n, train, test, a.out, seed=a.seed) for n in names}
    elif a.predictions:
        test = read_puzzles(src / "test.jsonl" if src.is_dir() else src)
        results = {Path(a.predictions).stem: score_predictions(test, read_predictions(a.predictions), seed=a.seed)}
    else:
        raise CellPuzzlesError("nothing to evaluate: pass --predictions FILE or --solver markers|random")
    print(format_table(results))
    for name, r in results.items():
        print(f"\n{name} by N:\n{format_by_n(r)}")
        if r.get("missing"):
            print(f"({r['missing']} puzzle(s) had no prediction and scored as ill-formed)")
    if a.json:
        print(json.dumps(results, indent=2, default=str))
    return 0


def _tracked(name: str, out: str, params: dict):
    """An MLflow run for a single step command (store: MLFLOW_TRACKING_URI or OUT/../mlflow.db)."""
    import mlflow

    from cellpuzzles.core.tracking import connect, flat_params

    connect(Path(out).resolve().parent)
    run = mlflow.start_run(run_name=name)
    mlflow.log_params(flat_params(params))
    return run


def _teacher(a, train_puzzles):
    if a.teacher == "markers":
        from cellpuzzles.distill.teachers.markers import MarkersTeacher

        if not train_puzzles:
            raise CellPuzzlesError("--teacher markers needs --train TRAIN.jsonl (it learns marker evidence from it)")
        return MarkersTeacher(train_puzzles)
    from cellpuzzles.distill.teachers.openai_teacher import OpenAITeacher, OpenAITeacherConfig

    if not a.base_url or not a.teacher_model:
        raise CellPuzzlesError("--teacher openai needs --base-url URL and --teacher-model NAME")
    return OpenAITeacher(OpenAITeacherConfig(
        base_url=a.base_url, model=a.teacher_model, api_key_env=a.api_key_env, concurrency=a.concurrency,
        timeout_s=a.timeout, cache_dir=Path(a.cache_dir)))


def cmd_distill(a) -> int:
    from cellpuzzles.distill.traces import DistillOptions, distill
    from cellpuzzles.task.puzzle import read_puzzles

    puzzles = read_puzzles(a.puzzles)
    train = read_puzzles(a.train) if a.train else []
    stats = distill(puzzles, _teacher(a, train), DistillOptions(attempts=a.attempts, threshold=a.threshold), a.out)
    print(f"kept {stats['accepted']}/{stats['puzzles']} traces (acceptance {stats['acceptance_rate']:.3f}; "
          f"{stats['calls']} calls, {stats['cached']} cached, "
          f"{stats['prompt_tokens'] + stats['completion_tokens']} tokens) -> {a.out}")
    return 0


def cmd_sft(a) -> int:
    from cellpuzzles.distill.traces import read_traces
    from cellpuzzles.inference.folder import PromptOptions
    from cellpuzzles.train.sft import SFTOptions, sft
    from cellpuzzles.train.tiny import TinyConfig, build_tiny

    pairs = read_traces(a.traces)
    model = a.model
    if model == "tiny":
        model = str(Path(a.out).parent / f"{Path(a.out).name}-init")
        build_tiny([p for p, _ in pairs], [t for _, t in pairs], model, TinyConfig(seed=a.seed),
                   PromptOptions(genes_per_cell=a.genes_per_cell))
    opt = from_args(SFTOptions, a, resume=not a.restart)
    with _tracked("sft", a.out, {"model": a.model, "traces": a.traces, **vars(opt)}):
        from cellpuzzles.train.callbacks import MetricsLogger

        path = sft(pairs, model, a.out, opt, callbacks=[MetricsLogger("sft")])
    print(f"wrote model folder {path}")
    return 0


def cmd_rl(a) -> int:
    from cellpuzzles.task.puzzle import read_puzzles
    from cellpuzzles.train.callbacks import MetricsLogger
    from cellpuzzles.train.rl import train_rl
    from cellpuzzles.train.rl_common import RLOptions

    train = read_puzzles(a.puzzles)
    opt = from_args(RLOptions, a, resume=not a.restart)
    val = read_puzzles(a.val) if a.val else train[-opt.val_size:]
    with _tracked(f"rl-{a.algo}", a.out, {"model": a.model, "puzzles": a.puzzles, **vars(opt)}):
        path = train_rl(train, val, a.model, a.out, opt, MetricsLogger(f"rl_{a.algo}"))
    print(f"wrote model folder {path}")
    return 0


def cmd_synth(a) -> int:
    from cellpuzzles.data.synth import synthesize

    info = synthesize(a.out, cells=a.cells, genes=a.genes, donors=a.donors, types=a.types,
                      seed=a.seed, density=a.density)
    print(f"wrote {a.out}: " + ", ".join(f"{k} {v}" for k, v in info.items() if k != "path"))
    return 0


def cmd_run(a) -> int:
    from cellpuzzles.pipelines.local import RunOptions, run

    params = dict(parse_key_value(x, "--param", "train_per_n=500", json_values=True) for x in a.param)
    for flag, key in (("model", "base_model"), ("sft_steps", "sft_steps"), ("rl_algo", "rl_algo")):
        if getattr(a, flag) is not None:
            params[key] = getattr(a, flag)
    if a.rl_steps is not None:
        params["rl_options"] = {**params.get("rl_options", {}), "max_steps": a.rl_steps}
    if a.eval_limit is not None:
        params["eval_options"] = {**params.get("eval_options", {}), "limit": a.eval_limit}
    run(RunOptions(data=a.data, out=a.out, column_map=a.map, seed=a.seed, params=params, cache=not a.no_cache))
    return 0


# command modules that register their own subcommands (imports stay light: heavy ones inside functions)
EXTRA_COMMANDS = ("release", "serve", "pipeline")


def build_parser() -> argparse.ArgumentParser:
    from cellpuzzles.steps.learning import SFTStepOptions
    from cellpuzzles.train.rl_common import RLOptions
    from cellpuzzles.train.sft import SFTOptions

    ap = argparse.ArgumentParser(prog="cellpuzzles", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="the main job: the retraining pipeline (pipelines/retrain.py) run locally with kfp.local")
    p.add_argument("--data", default=None, help="an .h5ad file (default: the bundled real PBMC data in data/)")
    p.add_argument("--map", action="append", default=[], metavar="FIELD=COLUMN")
    p.add_argument("--out", default="runs/default", help="output folder (default runs/default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="'tiny' (default, built from scratch) or a Hugging Face model folder")
    p.add_argument("--sft-steps", type=int, default=None)
    p.add_argument("--rl-steps", type=int, default=None, help="default: the algorithm's (40)")
    p.add_argument("--rl-algo", choices=["grpo", "ppo"], default=None, help="default grpo")
    p.add_argument("--eval-limit", type=int, default=None, help="decode only the first K test puzzles")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="any other pipeline parameter (repeatable), e.g. min_batch_accuracy=0.1")
    p.add_argument("--no-cache", action="store_true", help="rerun every step (default: reuse finished steps in OUT)")
    p.set_defaults(fn=cmd_run)

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

    p = sub.add_parser("evaluate", help="score predictions, or a baseline solver, on a test split")
    p.add_argument("--puzzles", required=True, help="test .jsonl, or a `cellpuzzles puzzles` output folder")
    p.add_argument("--predictions", default=None, help="JSONL lines {puzzle_id, completion}")
    p.add_argument("--solver", action="append", choices=["markers", "random"], default=None, help="baseline solver (repeatable)")
    p.add_argument("--train", default=None, help="train .jsonl for --solver when --puzzles is a file")
    p.add_argument("--out", default=None, help="folder for predictions and metrics")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="also print the full metrics as JSON")
    p.add_argument("--model", default=None, help="a model folder to decode with (free and constrained)")
    p.add_argument("--mode", action="append", choices=["free", "constrained"], default=None)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.set_defaults(fn=cmd_evaluate)

    p = sub.add_parser("distill", help="reasoning traces from a teacher, kept when the reward reaches --threshold")
    p.add_argument("--puzzles", required=True, help="puzzles to distill (e.g. reasoning.jsonl)")
    p.add_argument("--out", required=True, help="output traces .jsonl")
    p.add_argument("--teacher", choices=["markers", "openai"], default="markers")
    p.add_argument("--train", default=None, help="train puzzles the markers teacher learns from")
    p.add_argument("--attempts", type=int, default=1, help="tries per puzzle (rejection sampling)")
    p.add_argument("--threshold", type=float, default=1.0, help="keep traces whose reward is at least this")
    p.add_argument("--base-url", default=None, help="OpenAI-compatible endpoint, e.g. http://host:8000/v1")
    p.add_argument("--teacher-model", default=None, help="model name at that endpoint")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--cache-dir", default="work/teacher_cache", help="resumable cache of teacher answers")
    p.set_defaults(fn=cmd_distill)

    p = sub.add_parser("sft", help="supervised fine-tuning on distilled traces (TRL)")
    p.add_argument("--traces", required=True)
    p.add_argument("--model", default="tiny", help="'tiny' (built from the traces) or a Hugging Face model folder")
    p.add_argument("--out", required=True, help="output model folder")
    add_arguments(p, SFTOptions)
    add_arguments(p, SFTStepOptions, only=("genes_per_cell",))
    p.add_argument("--restart", action="store_true", help="ignore checkpoints in OUT.ckpt")
    p.set_defaults(fn=cmd_sft)

    p = sub.add_parser("rl", help="reinforcement learning with the batch-level reward (PPO or GRPO)")
    p.add_argument("--puzzles", required=True, help="RL puzzles (train.jsonl)")
    p.add_argument("--val", default=None, help="validation puzzles for batch accuracy at eval steps")
    p.add_argument("--model", required=True, help="the SFT model folder")
    p.add_argument("--out", required=True)
    add_arguments(p, RLOptions)
    p.add_argument("--restart", action="store_true", help="ignore checkpoints in OUT.ckpt")
    p.set_defaults(fn=cmd_rl)

    p = sub.add_parser("synth", help="write a synthetic CELLxGENE-schema .h5ad (donors, context, markers, sparsity)")
    p.add_argument("--cells", type=int, default=5000)
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--donors", type=int, default=4)
    p.add_argument("--types", type=int, default=10)
    p.add_argument("--density", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_synth)

    import importlib

    for mod in EXTRA_COMMANDS:  # each module adds its subcommands with add_commands(sub)
        importlib.import_module(f"cellpuzzles.cli.{mod}").add_commands(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except CellPuzzlesError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

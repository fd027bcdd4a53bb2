"""The ``cellpuzzles`` command line. Each command calls one library function."""

from __future__ import annotations

import argparse
import sys

from cellpuzzles.core.errors import CellPuzzlesError
from cellpuzzles.core.options import parse_key_value


def cmd_run(a) -> int:
    from cellpuzzles.pipelines.local import RunOptions, run

    params = dict(parse_key_value(x, "--param", "train_per_n=500", json_values=True) for x in a.param)
    for flag, key in (("model", "base_model"), ("rl_algo", "rl_algo")):
        if getattr(a, flag) is not None:
            params[key] = getattr(a, flag)
    if a.sft_steps is not None:
        params["sft_options"] = {**params.get("sft_options", {}), "max_steps": a.sft_steps}
    if a.rl_steps is not None:
        params["rl_options"] = {**params.get("rl_options", {}), "max_steps": a.rl_steps}
    if a.eval_limit is not None:
        params["eval_options"] = {**params.get("eval_options", {}), "limit": a.eval_limit}
    run(RunOptions(data=a.data, out=a.out, column_map=a.map, seed=a.seed, params=params, cache=not a.no_cache))
    return 0


# command modules that register their own subcommands (imports stay light: heavy ones inside functions)
COMMAND_MODULES = ("data", "learning", "release", "serve", "pipeline", "annotate")  # one per stage, each adds its subcommands


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cellpuzzles", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="the main job: the retraining pipeline (pipelines/retrain.py) run locally with kfp.local")
    p.add_argument("--data", default=None, help="an .h5ad file (default: the bundled real PBMC data in data/)")
    p.add_argument("--map", action="append", default=[], metavar="FIELD=COLUMN")
    p.add_argument("--out", default="runs/default", help="output folder (default runs/default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="'tiny' (default, built from scratch) or a Hugging Face model folder")
    p.add_argument("--sft-steps", type=int, default=None, help="default: the model kind's (tiny 900, pretrained one epoch)")
    p.add_argument("--rl-steps", type=int, default=None, help="default: the algorithm's (40)")
    p.add_argument("--rl-algo", choices=["grpo", "ppo"], default=None, help="default grpo")
    p.add_argument("--eval-limit", type=int, default=None, help="decode only K test puzzles, taken across every N (default: all)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="any other pipeline parameter (repeatable), e.g. min_batch_accuracy=0.1")
    p.add_argument("--no-cache", action="store_true", help="rerun every step (default: reuse finished steps in OUT)")
    p.set_defaults(fn=cmd_run)

    import importlib

    for mod in COMMAND_MODULES:  # each module adds its subcommands with add_commands(sub)
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

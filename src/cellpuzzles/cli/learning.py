"""`cellpuzzles evaluate | distill | sft | rl`: the learning stage's commands."""

from __future__ import annotations

import json
from pathlib import Path

from cellpuzzles.core.errors import CellPuzzlesError
from cellpuzzles.core.options import add_arguments, from_args


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
    if a.endpoint:  # a deployed model over HTTP (evaluation/endpoint.py)
        from cellpuzzles.evaluation.endpoint import EndpointOptions, evaluate_endpoint
        from cellpuzzles.inference.folder import load_prompt_options

        test = read_puzzles(src / "test.jsonl" if src.is_dir() else src)
        modes = a.mode or (["free"] if a.protocol == "openai" else ["free", "constrained"])
        opt = EndpointOptions(url=a.endpoint, protocol=a.protocol, max_tokens=a.max_new_tokens, model_dir=a.model)
        res = evaluate_endpoint(opt, test, a.out, modes=modes,
                                prompt=load_prompt_options(a.model) if a.model else None, seed=a.seed)
        print(format_table(res))
        return 0
    if a.model:
        from cellpuzzles.evaluation.evaluate import evaluate_model
        from cellpuzzles.evaluation.record import write_evaluation
        from cellpuzzles.evaluation.subset import stratified
        from cellpuzzles.inference.decode import DecodeOptions

        test = stratified(read_puzzles(src / "test.jsonl" if src.is_dir() else src), a.limit)
        dec = DecodeOptions(do_sample=a.do_sample, temperature=a.temperature, max_new_tokens=a.max_new_tokens, seed=a.seed)
        name = Path(a.model).name
        res = evaluate_model(a.model, test, a.out, modes=a.mode or ["free", "constrained"], decode=dec, name=name,
                             seed=a.seed)
        if a.out:  # the evaluation record `cellpuzzles register MODEL OUT` takes
            comps = {m: [read_predictions(Path(a.out) / f"predictions_{name}_{m}.jsonl")[p.puzzle_id] for p in test]
                     for m in res}
            print(f"evaluation record: {write_evaluation(a.out, name, test, comps, res)}")
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


def add_commands(sub) -> None:
    from cellpuzzles.steps.learning import SFTStepOptions
    from cellpuzzles.train.rl_common import RLOptions
    from cellpuzzles.train.sft import SFTOptions

    p = sub.add_parser("evaluate", help="score predictions, or a baseline solver, on a test split")
    p.add_argument("--puzzles", required=True, help="test .jsonl, or a `cellpuzzles puzzles` output folder")
    p.add_argument("--predictions", default=None, help="JSONL lines {puzzle_id, completion}")
    p.add_argument("--solver", action="append", choices=["markers", "random"], default=None, help="baseline solver (repeatable)")
    p.add_argument("--train", default=None, help="train .jsonl for --solver when --puzzles is a file")
    p.add_argument("--out", default=None, help="folder for predictions and metrics (with --model: also the "
                   "evaluation record that `cellpuzzles register` takes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="also print the full metrics as JSON")
    p.add_argument("--model", default=None, help="a model folder to decode with (free and constrained)")
    p.add_argument("--mode", action="append", choices=["free", "constrained"], default=None)
    p.add_argument("--endpoint", default=None, help="evaluate a deployed model at this URL over HTTP (with --model: "
                   "the model folder whose prompt options an openai endpoint needs)")
    p.add_argument("--protocol", choices=["v1", "openai"], default="v1",
                   help="--endpoint's protocol: the project's V1 route (free, constrained), or an OpenAI base URL (free)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="default: the model's budget (from its tokenizer and the traces it learnt)")
    p.add_argument("--limit", type=int, default=None, help="decode only K test puzzles, taken across every N")
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

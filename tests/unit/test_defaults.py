"""One default per option: the CLI's flags, the library's option dataclasses and the
pipeline's parameters agree, because the first and the last are derived from the second."""

import dataclasses

import pytest

from cellpuzzles.cli.main import build_parser
from cellpuzzles.core.options import defaults
from cellpuzzles.data.options import PuzzleOptions
from cellpuzzles.pipelines.retrain import retrain_pipeline
from cellpuzzles.release.gate import GateOptions
from cellpuzzles.release.verify import VerifyOptions
from cellpuzzles.serving.options import ServeOptions
from cellpuzzles.steps.data import DataOptions
from cellpuzzles.steps.learning import DistillStepOptions, SFTStepOptions
from cellpuzzles.train.rl_common import RLOptions
from cellpuzzles.train.sft import SFTOptions

PARSER = build_parser()
PIPELINE = {k: v.default for k, v in retrain_pipeline.component_spec.inputs.items()}

# command line -> (options class, {flag dest: field}) for the fields the command exposes
CLI = {
    ("puzzles", "x.h5ad", "--out", "o"): (PuzzleOptions, {f.name: f.name for f in dataclasses.fields(PuzzleOptions)}),
    ("sft", "--traces", "t", "--out", "o"): (SFTOptions, {"max_steps": "max_steps", "learning_rate": "learning_rate",
                                                          "batch_size": "batch_size", "grad_accum": "grad_accum",
                                                          "use_lora": "use_lora", "deepspeed": "deepspeed", "seed": "seed"}),
    ("rl", "--puzzles", "p", "--model", "m", "--out", "o"): (RLOptions, {
        "algo": "algo", "max_steps": "max_steps", "learning_rate": "learning_rate", "beta": "beta",
        "prompts_per_step": "prompts_per_step", "num_generations": "num_generations", "val_size": "val_size",
        "rollout": "rollout", "use_lora": "use_lora", "seed": "seed"}),
    ("gate",): (GateOptions, {f.name: f.name for f in dataclasses.fields(GateOptions)}),
    ("serve", "--model", "m"): (ServeOptions, {f.name: f.name for f in dataclasses.fields(ServeOptions) if f.name != "model"}),
}

# pipeline parameter -> (options class, field)
PIPE = {
    "data_source": (DataOptions, "source"), "data_version": (DataOptions, "version"), "top_k": (DataOptions, "top_k"),
    "column_map": (DataOptions, "column_map"),
    "n_min": (PuzzleOptions, "n_min"), "n_max": (PuzzleOptions, "n_max"), "train_per_n": (PuzzleOptions, "train_per_n"),
    "test_per_n": (PuzzleOptions, "test_per_n"), "split_by": (PuzzleOptions, "split_by"),
    "reasoning_fraction": (PuzzleOptions, "reasoning_fraction"), "seed": (PuzzleOptions, "seed"),
    "teacher": (DistillStepOptions, "teacher"), "teacher_attempts": (DistillStepOptions, "attempts"),
    "base_model": (SFTStepOptions, "model"),
    "rl_algo": (RLOptions, "algo"),
    "min_batch_accuracy": (GateOptions, "min_batch_accuracy"), "min_format_ratio": (GateOptions, "min_format_ratio"),
    "tolerance": (GateOptions, "tolerance"),
    "verify_sample": (VerifyOptions, "sample"), "verify_tolerance": (VerifyOptions, "tolerance"),
}


@pytest.mark.parametrize("argv", list(CLI), ids=lambda a: a[0])
def test_cli_flags_default_to_the_options_dataclass(argv):
    cls, dests = CLI[argv]
    ns = vars(PARSER.parse_args(list(argv)))
    want = defaults(cls)
    for dest, field in dests.items():
        assert dest in ns, f"cellpuzzles {argv[0]} has no flag for {cls.__name__}.{field}"
        assert ns[dest] == want[field], \
            f"cellpuzzles {argv[0]}: {dest} defaults to {ns[dest]!r}, {cls.__name__}.{field} to {want[field]!r}"


@pytest.mark.parametrize("param", list(PIPE))
def test_pipeline_parameters_default_to_the_options_dataclass(param):
    cls, field = PIPE[param]
    assert PIPELINE[param] == defaults(cls)[field]


def test_the_gate_floor_is_the_same_everywhere():
    floor = GateOptions().min_batch_accuracy
    assert floor > 0  # a floor of 0 would promote a model that solves nothing
    assert PIPELINE["min_batch_accuracy"] == floor
    assert PARSER.parse_args(["gate"]).min_batch_accuracy == floor


def test_pipeline_parameters_use_no_sentinels():
    """'Not set' never travels as 0 or -1: fields that default to None go in the step's options dict."""
    for name, value in PIPELINE.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            assert value >= 0, f"{name} defaults to {value}"
    for gone in ("rl_steps", "rl_learning_rate", "rl_beta", "eval_limit", "margin"):
        assert gone not in PIPELINE, f"{gone}: a field whose default is None belongs in the step's options dict"
    assert PIPELINE["rl_options"] == {} and PIPELINE["eval_options"] == {} and PIPELINE["gate_options"] == {}


def test_the_cli_run_flags_land_in_the_options_dicts(tmp_path, monkeypatch):
    import cellpuzzles.pipelines.local as local

    seen = {}
    monkeypatch.setattr(local, "run", lambda opt: seen.setdefault("opt", opt))
    from cellpuzzles.cli.main import main

    assert main(["run", "--out", str(tmp_path), "--rl-steps", "3", "--eval-limit", "7",
                 "--param", 'rl_options={"beta": 0.5}']) == 0
    assert seen["opt"].params["rl_options"] == {"beta": 0.5, "max_steps": 3}
    assert seen["opt"].params["eval_options"] == {"limit": 7}


def test_options_from_a_pipeline_dict_get_their_types_back():
    """A KFP dict parameter turns every number into a float; build() casts to the field's type."""
    from cellpuzzles.core.errors import CellPuzzlesError
    from cellpuzzles.core.options import build

    opt = build(RLOptions, {"max_steps": 2.0, "learning_rate": 1e-4}, algo="ppo")
    assert opt.max_steps == 2 and isinstance(opt.max_steps, int) and opt.learning_rate == 1e-4
    assert opt.beta == RLOptions(algo="ppo").beta  # unset fields keep the algorithm's default
    with pytest.raises(CellPuzzlesError, match="unknown option.*max_step\\b"):
        build(RLOptions, {"max_step": 2})

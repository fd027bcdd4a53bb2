"""Training runs on real bundled data with a very small model: SFT (learns, checkpoints,
resumes, refuses a corrupt checkpoint), GRPO with HF and scaffold rollouts, and the step
commands chained through the real CLI (subprocesses)."""

import json

import pytest

from cellpuzzles.core.errors import CellPuzzlesError
from cellpuzzles.inference.folder import load_model
from cellpuzzles.train.callbacks import MetricsLogger
from cellpuzzles.train.rl import train_rl
from cellpuzzles.train.rl_common import RLOptions
from cellpuzzles.train.sft import SFTOptions, sft

from helpers.cli import run_cli
from helpers.models import as_scaffold_model, assert_loads_as_saved, build_world
from helpers.production import build_production_model


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Bundled data -> puzzles -> markers traces -> an untrained tiny model (10 genes per cell)."""
    return build_world(tmp_path_factory.mktemp("learn"), genes_per_cell=10, train_per_n=40, test_per_n=6)


@pytest.fixture(scope="module")
def scaffold_model(world):
    """The tiny model folder marked as trained on scaffold traces restating 6 genes."""
    return as_scaffold_model(world["folder"], world["root"] / "model-scaffold", genes_per_cell=10, restated_genes=6)


@pytest.fixture(scope="module")
def production(world):
    """The production-shaped model (byte-level BPE, Qwen chat template) on the same traces."""
    return build_production_model([p for p, _ in world["pairs"]], [t for _, t in world["pairs"]],
                                  world["root"] / "qwen2", genes_per_cell=10)


# (learning rate, sequences per step, loss drop over 30 steps in nats, kind recorded). Both
# train in full here: the production-shaped model's weights are random, and LoRA cannot move a
# random model's flat output (its frozen embeddings and norms); LoRA, its default as a
# pretrained folder, is checked in test_pretrained_path.py
SFT_CASES = {"tiny": (3e-3, 16, 1.0, "tiny"), "qwen2": (3e-3, 8, 1.0, "pretrained")}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(SFT_CASES))
def test_sft_learns_checkpoints_and_resumes(world, production, tmp_path, kind):
    start = world["folder"] if kind == "tiny" else production
    lr, batch, drop, saved_kind = SFT_CASES[kind]
    out = tmp_path / "sft"
    log = MetricsLogger("sft")
    opt = SFTOptions(max_steps=30, learning_rate=lr, batch_size=batch, grad_accum=1, use_lora=False, logging_steps=5,
                     save_steps=15, eval_steps=15)
    sft(world["pairs"], start, out, opt, callbacks=[log])
    losses = [h["loss"] for h in log.history if "loss" in h]
    assert losses[-1] < losses[0] - drop  # nats
    assert (out / "config.json").is_file() and (out / "cellpuzzles.json").is_file()
    # the traces are scaffolds restating 6 genes: the folder says so, so decoding uses the scaffold
    saved = json.loads((out / "cellpuzzles.json").read_text())
    assert {k: saved[k] for k in ("genes_per_cell", "restated_genes", "kind")} == {
        "genes_per_cell": 10, "restated_genes": 6, "kind": saved_kind}
    assert_loads_as_saved(out, start)
    # resume: more steps continue from the last checkpoint instead of starting over
    log2 = MetricsLogger("sft")
    sft(world["pairs"], start, out, SFTOptions(**{**opt.__dict__, "max_steps": 35}), callbacks=[log2])
    assert min(h["step"] for h in log2.history) > 30
    # a corrupt newest checkpoint is a clear error, not a silent restart
    ckpt = sorted((out.parent / "sft.ckpt").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    for f in ckpt.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(CellPuzzlesError, match="corrupt"):
        sft(world["pairs"], start, out, SFTOptions(**{**opt.__dict__, "max_steps": 40}))


@pytest.mark.slow
def test_grpo_runs_and_logs_reward_kl_format_and_val_accuracy(world, tmp_path):
    log = MetricsLogger("rl")
    out = train_rl(world["splits"]["train"][:16], world["splits"]["test"][:4], world["folder"], tmp_path / "grpo",
                   RLOptions(max_steps=2, prompts_per_step=2, num_generations=2, eval_steps=1,
                             max_completion_length=40, resume=False, rollout="hf"), log)
    keys = set().union(*(h.keys() for h in log.history))
    assert {"reward", "reward_std", "kl", "rewards/format_ok/mean", "completions/mean_length", "val_batch_accuracy"} <= keys
    assert_loads_as_saved(out, world["folder"])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["tiny", "qwen2"])
def test_grpo_with_scaffold_rollouts_gets_a_reward_signal(world, scaffold_model, production, tmp_path, kind):
    """The production-shaped model trains through LoRA (its default as a pretrained folder)."""
    if kind == "qwen2":
        scaffold_model = as_scaffold_model(production, tmp_path / "scaffold", genes_per_cell=10, restated_genes=6)
    log = MetricsLogger("rl")
    train = world["splits"]["train"][:16]
    out = train_rl(train, world["splits"]["test"][:4], scaffold_model, tmp_path / "grpo",
                   RLOptions(max_steps=3, prompts_per_step=2, num_generations=4, eval_steps=3,
                             learning_rate=1e-3, resume=False), log)  # rollout "auto" -> scaffold
    steps = [h for h in log.history if "reward" in h]
    assert len(steps) == 3
    assert all(h["rewards/format_ok/mean"] == 1.0 and h["reward"] >= 0.0 for h in steps)  # never the -1 of a bad answer
    # policy tokens only: the type names' tokens, one name per cell (n = 3..5; a BPE name is 1-14 tokens)
    per_name = (1, 1) if kind == "tiny" else (1, 14)
    assert all(3 * per_name[0] <= h["completions/mean_length"] <= 5 * per_name[1] for h in steps)
    assert any(h["reward_std"] > 0 for h in steps)  # groups differ, so GRPO has an advantage to follow
    assert any("val_batch_accuracy" in h for h in log.history)
    before, _, _ = load_model(scaffold_model)
    after = assert_loads_as_saved(out, scaffold_model)
    assert json.loads((out / "cellpuzzles.json").read_text())["restated_genes"] == 6
    assert any((a - b).abs().max() > 0 for a, b in zip(after.parameters(), before.parameters()))


def test_rollout_choice_errors_are_clear(world, scaffold_model, tmp_path):
    with pytest.raises(CellPuzzlesError, match="scaffold traces"):
        train_rl(world["splits"]["train"][:8], [], world["folder"], tmp_path / "g", RLOptions(rollout="scaffold"))
    with pytest.raises(CellPuzzlesError, match="use --algo grpo"):
        train_rl(world["splits"]["train"][:8], [], scaffold_model, tmp_path / "p", RLOptions(algo="ppo", rollout="vllm"))


@pytest.mark.slow
def test_step_commands_chain_through_the_cli(world, tmp_path):
    from cellpuzzles.task.puzzle import write_puzzles

    s = world["splits"]
    for name in ("train", "reasoning", "test"):
        write_puzzles(tmp_path / f"{name}.jsonl", s[name][:24])
    r = run_cli("distill", "--puzzles", tmp_path / "reasoning.jsonl", "--train", tmp_path / "train.jsonl",
                "--out", tmp_path / "traces.jsonl", cwd=tmp_path)
    assert r.returncode == 0 and "kept" in r.stdout, r.stderr[-1500:]
    r = run_cli("sft", "--traces", tmp_path / "traces.jsonl", "--out", tmp_path / "models" / "sft", "--steps", "3",
                "--batch-size", "8", "--genes-per-cell", "8", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-1500:]
    r = run_cli("rl", "--algo", "grpo", "--puzzles", tmp_path / "train.jsonl", "--model", tmp_path / "models" / "sft",
                "--out", tmp_path / "models" / "grpo", "--steps", "1", "--prompts-per-step", "2",
                "--num-generations", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-1500:]
    r = run_cli("evaluate", "--model", tmp_path / "models" / "grpo", "--puzzles", tmp_path / "test.jsonl",
                "--out", tmp_path / "eval", cwd=tmp_path)
    assert r.returncode == 0 and "constrained" in r.stdout, r.stderr[-1500:]
    assert (tmp_path / "eval" / "metrics_grpo_constrained.json").is_file()
    assert (tmp_path / "models" / "mlflow.db").is_file()  # each step command logged its own MLflow run
    bad = run_cli("sft", "--traces", tmp_path / "test.jsonl", "--out", tmp_path / "x", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.startswith("error:")  # puzzles without traces

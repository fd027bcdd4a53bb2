"""Same versions + same seed -> the same weights after SFT and after RL, bit for bit (CPU):
the platform's runs are repeatable, so a figure in the docs can be regenerated."""

import pytest
import torch
from safetensors.torch import load_file

from cellpuzzles.train.rl import train_rl
from cellpuzzles.train.rl_common import RLOptions
from cellpuzzles.train.sft import SFTOptions, sft

from helpers.models import as_scaffold_model, build_world
from helpers.production import build_production_model


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("determinism"), genes_per_cell=8, train_per_n=20, test_per_n=4)


def weights(folder):
    return load_file(folder / "model.safetensors")


def assert_same(a, b):
    assert set(a) == set(b)
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert differ == [], f"{len(differ)} tensors differ, e.g. {differ[:3]}"


@pytest.fixture(scope="module")
def models(world):
    """The tiny default, and the production-shaped model (trained through LoRA, its default)."""
    qwen = build_production_model([p for p, _ in world["pairs"]], [t for _, t in world["pairs"]], world["root"] / "qwen2",
                                  genes_per_cell=8)
    return {"tiny": world["folder"], "qwen2": qwen}


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("kind", ["tiny", "qwen2"])
def test_sft_twice_gives_identical_weights_and_another_seed_does_not(world, models, tmp_path, kind):
    opt = SFTOptions(max_steps=6 if kind == "tiny" else 3, batch_size=8, grad_accum=1, learning_rate=3e-3,
                     save_steps=100, eval_steps=100, resume=False)
    start = models[kind]
    a = sft(world["pairs"], start, tmp_path / "a", opt)
    b = sft(world["pairs"], start, tmp_path / "b", opt)
    assert_same(weights(a), weights(b))
    c = sft(world["pairs"], start, tmp_path / "c", SFTOptions(**{**opt.__dict__, "seed": 1}))
    assert any(not torch.equal(x, y) for x, y in zip(weights(a).values(), weights(c).values()))


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("algo,kind", [("grpo", "tiny"), ("ppo", "tiny"), ("grpo", "qwen2"), ("ppo", "qwen2")])
def test_rl_twice_gives_identical_weights(world, models, tmp_path, algo, kind):
    model = as_scaffold_model(models[kind], tmp_path / "scaffold", genes_per_cell=8, restated_genes=4)
    train = world["splits"]["train"][:16]
    opt = RLOptions(algo=algo, max_steps=2, prompts_per_step=4, num_generations=2, eval_steps=100, save_steps=100,
                    learning_rate=1e-3, resume=False)
    a = train_rl(train, [], model, tmp_path / "a", opt)
    b = train_rl(train, [], model, tmp_path / "b", opt)
    wa, wb = weights(a), weights(b)
    assert_same(wa, wb)
    start = weights(model)
    assert any(not torch.equal(wa[k], start[k]) for k in start)  # RL changed the weights, identically twice

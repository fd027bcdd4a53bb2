"""A user's own Hugging Face model through every step (issue: any model, correct at every step).

Two models: the tiny default and the production-shaped one (tests/helpers/production.py: byte-
level BPE saved as Qwen2Tokenizer, Qwen2.5-Instruct's chat template, Qwen's generation_config,
cell-type names of 4-14 tokens). Checked: per-kind training defaults (LoRA for a pretrained
folder, full training for tiny), token budgets from the tokenizer that the teacher's own traces
fit, greedy decoding that ignores a model's sampling/penalty settings, saved folders that plain
transformers loads for inference, and the CLI path sft -> evaluate --out -> register -> gate
against a real MLflow server."""

import json
import shutil

import pytest

from helpers.cli import run_cli
from helpers.models import build_world
from helpers.production import build_production_model

pytestmark = pytest.mark.slow
KINDS = ["tiny", "qwen2", "llama"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = build_world(tmp_path_factory.mktemp("byo"), genes_per_cell=8, train_per_n=20, test_per_n=4)
    puzzles, traces = [p for p, _ in w["pairs"]], [t for _, t in w["pairs"]]
    w["models"] = {"tiny": w["folder"]}
    for arch in ("qwen2", "llama"):
        w["models"][arch] = build_production_model(puzzles, traces, w["root"] / arch, arch=arch, genes_per_cell=8)
    return w


@pytest.fixture(scope="module")
def trained(world):
    """Two SFT steps from each untrained folder, with every other option left to the model's kind."""
    from cellpuzzles.train.sft import SFTOptions, sft

    out = {}
    for kind in ("tiny", "qwen2"):
        opt = SFTOptions(max_steps=2, batch_size=4, grad_accum=1, eval_fraction=0.0, save_steps=100, resume=False)
        out[kind] = sft(world["pairs"], world["models"][kind], world["root"] / f"sft_{kind}", opt)
    return out


def _test_traces(world):
    return [(p, world["teacher"].trace(p)) for p in world["splits"]["test"]]


@pytest.mark.parametrize("kind", KINDS)
def test_the_teachers_traces_fit_the_budget_of_an_untrained_folder(world, kind):
    """A folder that records no traces gets a budget estimated from the prompt; the markers
    teacher's own traces of the test puzzles must fit it in that tokenizer."""
    from cellpuzzles.inference.budget import new_token_budget, trace_tokens
    from cellpuzzles.inference.folder import load_model

    _, tok, prompt = load_model(world["models"][kind])
    assert prompt.tokens_per_cell is None
    for p, trace in _test_traces(world):
        shown = prompt.apply(p)
        assert trace_tokens(tok, trace) <= new_token_budget(tok, [shown], None), (kind, p.n)


@pytest.mark.parametrize("kind", ["tiny", "qwen2"])
def test_sft_records_a_budget_that_the_teachers_traces_fit(world, trained, kind):
    from cellpuzzles.inference.budget import new_token_budget, trace_tokens
    from cellpuzzles.inference.folder import load_model

    _, tok, prompt = load_model(trained[kind])
    assert prompt.tokens_per_cell and prompt.tokens_per_cell > 0
    longest = max(trace_tokens(tok, t) for _, t in world["pairs"])
    for p, trace in _test_traces(world):
        budget = new_token_budget(tok, [prompt.apply(p)], prompt.tokens_per_cell)
        assert trace_tokens(tok, trace) <= budget, (kind, p.n, budget)
    # ... and the budget follows this tokenizer: the BPE model's traces are longer in tokens
    if kind == "qwen2":
        _, tiny_tok, _ = load_model(trained["tiny"])
        assert longest > max(trace_tokens(tiny_tok, t) for _, t in world["pairs"])


def test_a_pretrained_folder_trains_lora_and_the_tiny_one_trains_in_full(world, trained):
    """LoRA on every linear layer leaves the embeddings as they were; full training moves them."""
    from cellpuzzles.inference.folder import load_model

    def changed(kind):
        before, _, _ = load_model(world["models"][kind])
        after, _, prompt = load_model(trained[kind])
        a, b = before.state_dict(), after.state_dict()
        emb = "model.embed_tokens.weight"
        linear = next(k for k in a if k.endswith("q_proj.weight"))
        return (not a[emb].equal(b[emb])), (not a[linear].equal(b[linear])), prompt.kind

    assert changed("qwen2") == (False, True, "pretrained")
    assert changed("tiny") == (True, True, "tiny")


@pytest.mark.parametrize("kind", ["tiny", "qwen2"])
def test_a_saved_folder_loads_for_inference_with_plain_transformers(trained, kind):
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = trained[kind]
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg.get("use_cache") is True and "local_files_only" not in cfg
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    assert AutoConfig.from_pretrained(str(folder)).use_cache and model.config.use_cache


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_greedy_is_greedy_whatever_the_models_generation_config(world, tmp_path, kind):
    """Qwen's generation_config samples with a repetition penalty and top_k; free decoding must
    still pick the arg-max token at every step (here the folder's penalties are made extreme)."""
    import torch

    from cellpuzzles.inference.decode import DecodeOptions, generate
    from cellpuzzles.inference.folder import load_model
    from cellpuzzles.inference.prompting import prompt_text

    folder = tmp_path / kind
    shutil.copytree(world["models"][kind], folder)
    gen = json.loads((folder / "generation_config.json").read_text())
    assert gen["do_sample"] is True and gen["repetition_penalty"] > 1
    gen.update(repetition_penalty=1e6, no_repeat_ngram_size=1)
    (folder / "generation_config.json").write_text(json.dumps(gen))
    model, tok, prompt = load_model(folder)
    p = prompt.apply(world["splits"]["test"][0])
    out = generate(model, tok, [p], DecodeOptions(max_new_tokens=12))[0]
    ids = tok(prompt_text(tok, p), return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        for _ in range(12):
            nxt = model(ids).logits[0, -1].argmax().view(1, 1)
            ids = torch.cat([ids, nxt], 1)
            if nxt.item() == tok.eos_token_id:
                break
    n_prompt = len(tok(prompt_text(tok, p), add_special_tokens=False)["input_ids"])
    assert out == tok.decode(ids[0, n_prompt:], skip_special_tokens=True)


def test_evaluate_limit_takes_every_puzzle_size(world):
    from cellpuzzles.evaluation.subset import stratified

    test = sorted(world["splits"]["test"], key=lambda p: p.n)
    picked = stratified(test, 6)
    assert len(picked) == 6 and {p.n for p in picked} == {p.n for p in test}
    assert [p.puzzle_id for p in picked] == [p.puzzle_id for p in test if p in picked]  # the split's order
    assert stratified(test, None) == test


def test_cli_path_sft_evaluate_register_gate_with_the_production_shaped_model(world, tmp_path, mlflow_server):
    """cellpuzzles sft -> evaluate --out (writes the evaluation record) -> register -> gate, on a
    real MLflow server; the gate refuses a model under the floor (exit 4)."""
    from cellpuzzles.release.gate import GateOptions
    from cellpuzzles.task.puzzle import write_puzzles

    pz = tmp_path / "puzzles"
    pz.mkdir()
    write_puzzles(pz / "test.jsonl", world["splits"]["test"])
    env = {"MLFLOW_TRACKING_URI": mlflow_server["uri"]}
    r = run_cli("sft", "--traces", str(world["root"] / "traces.jsonl"), "--model", str(world["models"]["qwen2"]),
                "--out", str(tmp_path / "m"), "--steps", "2", "--batch-size", "4", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli("evaluate", "--model", str(tmp_path / "m"), "--puzzles", str(pz), "--out", str(tmp_path / "ev"),
                "--limit", "6", "--mode", "constrained", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "ev" / "evaluation.json").is_file() and "evaluation record" in r.stdout
    rec = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert rec["n_puzzles"] == 6 and len({len(v) for v in rec["types"].values()}) > 1  # several N
    name = "byo"
    r = run_cli("register", str(tmp_path / "m"), str(tmp_path / "ev"), "--name", name, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli("gate", "--name", name, env=env)
    assert r.returncode in (0, 4), r.stderr[-2000:]
    acc = rec["modes"]["constrained"]["metrics"]["batch_accuracy"]
    if acc < GateOptions().min_batch_accuracy:  # two SFT steps from random weights: expected
        assert r.returncode == 4, r.stdout[-1500:]


def test_the_pipeline_runs_end_to_end_with_a_pretrained_folder(world, tmp_path):
    """`cellpuzzles run --model FOLDER` (the production-shaped model) through every step to a gate
    decision: LoRA and the pretrained defaults (only sizes are made small here), the model's
    budget recorded by SFT, the markers teacher shown every gene the model sees."""
    import subprocess
    import sys

    from helpers.paths import ROOT

    for name in ("data.dvc", ".dvcignore"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / ".dvc", tmp_path / ".dvc", ignore=shutil.ignore_patterns("cache", "tmp"))
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    folder = build_production_model([p for p, _ in world["pairs"]], [t for _, t in world["pairs"]], tmp_path / "qwen")
    small = ['sft_options={"max_steps": 2, "batch_size": 4, "grad_accum": 1}',
             'rl_options={"max_steps": 1, "prompts_per_step": 2, "num_generations": 2}',
             "train_per_n=30", "test_per_n=4", "n_max=4"]
    r = subprocess.run([sys.executable, "-m", "cellpuzzles.cli", "run", "--model", str(folder), "--out", "out",
                        "--eval-limit", "4", *[x for kv in small for x in ("--param", kv)]],
                       cwd=tmp_path, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["gate"]["decision"] in ("pass", "fail") and "gate: " in r.stdout
    job = next((tmp_path / "out" / "pipeline").glob("cellpuzzles-retrain-*"))
    sft_folder = next(p.parent for p in job.glob("sft/**/cellpuzzles.json"))
    saved = json.loads((sft_folder / "cellpuzzles.json").read_text())
    assert saved["kind"] == "pretrained" and saved["genes_per_cell"] is None and saved["tokens_per_cell"] > 0
    # the teacher cites evidence beyond the tiny model's 6 genes: it sees what this model sees
    from cellpuzzles.distill.traces import read_traces

    beyond = 0
    for p, trace in read_traces(next(job.glob("distill/**/traces.jsonl"))):
        for genes, line in zip(p.genes, trace.split("</think>")[0].splitlines()):
            cited = line.rpartition(": ")[2].split("; ")[0].split(", ")
            beyond += any(g in genes[6:] and g not in genes[:6] for g in cited)
    assert beyond > 0
    # the untrained start is the base folder itself: named by the sft step, not copied, evaluated as is
    pointer = json.loads(next(job.glob("sft/**/start/start.json")).read_text())
    assert pointer == {"model": str(folder.resolve())} and not next(job.glob("sft/**/start")).joinpath("config.json").exists()
    assert set(s["models"]) == {"start", "sft", "grpo"} and set(s["models"]["start"]) == {"constrained"}
    assert s["models"]["start"]["constrained"]["n"] == s["models"]["sft"]["constrained"]["n"]


def test_the_teacher_is_shown_what_the_student_sees(world):
    from cellpuzzles.steps.learning import SFTStepOptions, student_genes

    assert student_genes("tiny") == SFTStepOptions().genes_per_cell == 6
    assert student_genes(str(world["models"]["qwen2"])) == 8  # the folder's own prompt options

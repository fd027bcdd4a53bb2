"""Run-to-run determinism of SFT training on a GPU (issue 19: "where something cannot be
deterministic, say so and measure the spread").

Trains the same model from the same seed on the same data several times in one process and
compares each run with the first: max |delta weight| over all parameters (and relative to the
largest weight), how many parameter tensors differ at all, the largest per-step loss
difference, and whether the final weights are bit-identical.

* ``plain``: a bare PyTorch + transformers loop (Qwen2 "small" shape: hidden 512, 4 layers,
  vocab 16k; batch 8 x 256 tokens, AdamW fused, SDPA), in bf16 and in fp32 weights.
* ``project``: ``cellpuzzles.train.sft.sft`` (TRL SFTTrainer, the project's defaults: bf16
  autocast on a GPU, no packing, full training for this small model) twice, same seed;
  compares the saved model folders (batch 4, 10 steps, 988-token prompts + 64-256-token
  completions, max_length 1536). Skipped if TRL/datasets cannot be imported.

``--deterministic`` sets CUBLAS_WORKSPACE_CONFIG=:4096:8 before torch is imported and
``torch.use_deterministic_algorithms(True)`` (strict; if an op has no deterministic kernel,
the error is recorded and the runs are repeated with ``warn_only=True``). Run once without and
once with it (two processes: the cuBLAS setting must precede CUDA's start).

    python benchmarks/gpu_determinism.py --json off.json
    python benchmarks/gpu_determinism.py --deterministic --json on.json
    python benchmarks/gpu_determinism.py --shape toy --steps 2 --runs 2   # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path


def compare(ref: dict, other: dict) -> dict:
    import torch

    max_abs, max_w, differ, n = 0.0, 0.0, 0, 0
    for k, a in ref.items():
        b = other[k]
        n += 1
        if not torch.equal(a, b):
            differ += 1
            max_abs = max(max_abs, float((a.float() - b.float()).abs().max()))
        max_w = max(max_w, float(a.float().abs().max()))
    return {"bit_identical": differ == 0, "tensors_differing": differ, "tensors": n,
            "max_abs_dweight": max_abs, "max_abs_dweight_rel": max_abs / max_w if max_w else 0.0}


def loss_diff(ref: list, other: list) -> dict:
    d = [abs(x - y) for x, y in zip(ref, other)]
    first = next((i for i, x in enumerate(d) if x > 0), None)
    return {"max_abs_dloss": max(d) if d else 0.0, "final_abs_dloss": d[-1] if d else 0.0,
            "first_step_differing": first}


def plain_runs(cfg_kw: dict, dtype_name: str, runs: int, steps: int, batch: int, seq: int, dev: str) -> dict:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    cfg = Qwen2Config(**cfg_kw, max_position_embeddings=max(seq, 512), tie_word_embeddings=True,
                      attn_implementation="sdpa")
    g = torch.Generator().manual_seed(1)
    data = [torch.randint(0, cfg.vocab_size, (batch, seq), generator=g) for _ in range(steps)]
    finals, losses, times = [], [], []
    for _ in range(runs):
        torch.manual_seed(0)
        torch.cuda.manual_seed_all(0)
        model = Qwen2ForCausalLM(cfg).to(dev, dtype)  # initialised on the CPU from the seed: identical
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=dev == "cuda")
        run_losses = []
        t0 = time.perf_counter()
        for x in data:
            x = x.to(dev)
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            run_losses.append(loss.detach())
        run_losses = [float(v) for v in run_losses]
        times.append(time.perf_counter() - t0)
        finals.append({k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
        losses.append(run_losses)
        del model, opt
    out = {"dtype": dtype_name, "runs": runs, "steps": steps, "batch": batch, "seq": seq,
           "params": sum(v.numel() for v in finals[0].values()), "seconds_per_run": times,
           "first_loss": losses[0][0], "last_loss": losses[0][-1],
           "vs_run0": [dict(**compare(finals[0], f), **loss_diff(losses[0], lo))
                       for f, lo in zip(finals[1:], losses[1:])]}
    return out


def project_runs(cfg_kw: dict, runs: int, steps: int, batch: int, seq: int, work: Path) -> dict:
    import torch
    from safetensors.torch import load_file
    from sft_gpu import byte_tokenizer, records
    from transformers import Qwen2Config, Qwen2ForCausalLM, TrainerCallback

    from cellpuzzles.inference.folder import PromptOptions, save
    from cellpuzzles.train.sft import SFTOptions, sft

    cfg = Qwen2Config(**cfg_kw, max_position_embeddings=max(seq, 512), tie_word_embeddings=True,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    save(Qwen2ForCausalLM(cfg), byte_tokenizer(), work / "init", PromptOptions())
    pairs = records(steps * batch + batch, 64, 256, torch.Generator().manual_seed(2))  # + a 988-token prompt

    finals, losses, times = [], [], []
    for i in range(runs):
        run_losses: list = []

        class Log(TrainerCallback):
            def __init__(self, sink: list):
                self.sink = sink

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    self.sink.append(float(logs["loss"]))

        t0 = time.perf_counter()
        out = sft(pairs, work / "init", work / f"run{i}", SFTOptions(
            max_steps=steps, batch_size=batch, grad_accum=1, learning_rate=1e-3, use_lora=False, eval_fraction=0.0,
            save_steps=10**6, logging_steps=1, max_length=seq, resume=False, seed=0), callbacks=[Log(run_losses)])
        times.append(time.perf_counter() - t0)
        w = {}
        for f in sorted(Path(out).glob("*.safetensors")):
            w.update(load_file(f))
        finals.append(w)
        losses.append(run_losses)
    return {"runs": runs, "steps": steps, "batch": batch, "max_length": seq, "bf16_autocast": torch.cuda.is_available(),
            "seconds_per_run": times, "losses_run0": losses[0],
            "vs_run0": [dict(**compare(finals[0], f), **loss_diff(losses[0], lo))
                        for f, lo in zip(finals[1:], losses[1:])]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--deterministic", action="store_true",
                    help="CUBLAS_WORKSPACE_CONFIG=:4096:8 + torch.use_deterministic_algorithms(True)")
    ap.add_argument("--shape", choices=("small", "toy"), default="small")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--no-project", action="store_true", help="skip the project's sft() runs")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    if a.deterministic:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from sft_gpu import SHAPES, versions

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    res = {"benchmark": "gpu_determinism", "deterministic": a.deterministic, "device": dev,
           "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG"), "shape": a.shape,
           "config": SHAPES[a.shape], "versions": versions(), "strict_error": None, "plain": {}, "project": None}

    def dump():
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=2))

    def with_mode(fn):
        """Run fn under the requested mode; strict deterministic mode falls back to warn_only."""
        if not a.deterministic:
            torch.use_deterministic_algorithms(False)
            return fn()
        torch.use_deterministic_algorithms(True)
        try:
            return fn()
        except RuntimeError as e:
            if "deterministic" not in str(e):
                raise
            res["strict_error"] = (res["strict_error"] or "") + str(e)[:400] + " || "
            print(f"strict deterministic mode failed: {str(e)[:300]}; retrying with warn_only=True", flush=True)
            torch.use_deterministic_algorithms(True, warn_only=True)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out = fn()
            res.setdefault("warn_only_warnings", []).extend(sorted({str(w.message)[:200] for w in caught}))
            torch.use_deterministic_algorithms(True)
            return out

    print(f"device {dev} ({res['versions'].get('gpu')}), deterministic={a.deterministic}, shape {a.shape}", flush=True)
    for dt in [d.strip() for d in a.dtypes.split(",") if d.strip()]:
        try:
            r = with_mode(lambda dt=dt: plain_runs(SHAPES[a.shape], dt, a.runs, a.steps, a.batch, a.seq, dev))
        except Exception as e:  # noqa: BLE001
            r = {"error": f"{type(e).__name__}: {str(e)[:400]}", "trace": traceback.format_exc(limit=6)}
        res["plain"][dt] = r
        dump()
        print(f"plain {dt}: {json.dumps({k: v for k, v in r.items() if k != 'trace'})}", flush=True)

    if not a.no_project:
        try:
            import datasets  # noqa: F401
            import trl  # noqa: F401
        except ImportError as e:
            res["project"] = {"skipped": f"cannot import TRL/datasets here: {e}"}
        else:
            try:
                work = Path(tempfile.mkdtemp(prefix="bench-det-"))
                res["project"] = with_mode(lambda: project_runs(SHAPES[a.shape], 2, min(a.steps, 10), 4, 1536, work))
            except Exception as e:  # noqa: BLE001
                res["project"] = {"error": f"{type(e).__name__}: {str(e)[:400]}", "trace": traceback.format_exc(limit=8)}
        dump()
        print(f"project sft(): {json.dumps({k: v for k, v in res['project'].items() if k != 'trace'})}", flush=True)

    print("\nsummary (run k vs run 0: bit-identical, max |dW|, max |dW|/max|W|, max |dloss|):")
    rows = [(f"plain {k}", v) for k, v in res["plain"].items()] + [("project sft()", res["project"] or {})]
    for name, r in rows:
        for i, c in enumerate(r.get("vs_run0", []), start=1):
            print(f"  det={str(a.deterministic):5s} {name:14s} run{i}: identical={c['bit_identical']}  "
                  f"max|dW|={c['max_abs_dweight']:.3e}  rel={c['max_abs_dweight_rel']:.3e}  "
                  f"max|dloss|={c['max_abs_dloss']:.3e}  differing tensors {c['tensors_differing']}/{c['tensors']}")
        if "error" in r or "skipped" in r:
            print(f"  det={a.deterministic} {name}: {r.get('error') or r.get('skipped')}")
    dump()


if __name__ == "__main__":
    main()

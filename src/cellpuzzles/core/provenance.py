"""Where a figure came from: package versions, the code's commit, the machine."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGES = ("cellpuzzles", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers", "numpy",
            "scipy", "scikit-learn", "anndata", "scanpy", "kfp", "mlflow", "kserve", "great-expectations", "dvc")


def versions(packages=PACKAGES) -> dict[str, str | None]:
    out = {}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def commit(repo: str | os.PathLike = ".") -> dict:
    """The git commit of ``repo`` and whether the work tree had changes (None outside a repository)."""
    def git(*args):
        r = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10)
        return r.stdout.strip() if r.returncode == 0 else None

    try:
        head = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None, "dirty": None}
    return {"commit": head, "dirty": bool(dirty) if dirty is not None else None}


def machine() -> dict:
    cpu = platform.processor() or None
    info = Path("/proc/cpuinfo")
    if info.is_file():
        names = [ln.split(":", 1)[1].strip() for ln in info.read_text().splitlines() if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cpus": os.cpu_count(), "torch_threads": _torch_threads()}


def _torch_threads() -> int | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.get_num_threads()


def provenance(repo: str | os.PathLike = ".") -> dict:
    return {"versions": versions(), "code": commit(repo), "machine": machine()}

"""DVC lineage for the raw inputs under data/ (tracked by data.dvc)."""

from __future__ import annotations

import os
from pathlib import Path


def sync_cache(repo_root: str | os.PathLike = ".", target: str = "data") -> str:
    """After materialising ``target``: if its bytes are what ``target.dvc`` records, put
    them in the local DVC cache (so ``dvc status`` is clean and ``dvc push`` works) and
    return "matches"; return "differs" when they are not (nothing is changed), or
    "untracked" when there is no DVC repo or .dvc file."""
    root = Path(repo_root)
    if not (root / ".dvc").is_dir() or not (root / f"{target}.dvc").is_file():
        return "untracked"
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        status = repo.data_status(granular=False)
        uncommitted = status.get("uncommitted") or {}
        if any(f"{target}/" in v or target in v for v in uncommitted.values()):
            return "differs"
        if f"{target}/" in (status.get("not_in_cache") or []):
            repo.commit(f"{target}.dvc", force=True)
        return "matches"

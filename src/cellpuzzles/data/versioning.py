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


def file_md5(path: str | os.PathLike) -> str:
    import hashlib

    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "md5").hexdigest()


def dvc_md5(dvc_file_text: str) -> str | None:
    import yaml

    outs = (yaml.safe_load(dvc_file_text) or {}).get("outs") or [{}]
    return outs[0].get("md5")


def data_lineage(data_file: str | os.PathLike) -> dict:
    """The data version: the md5 recorded in the nearest ``<folder>.dvc`` above the file
    (the DVC hash of the tracked folder) and the md5 of the file itself."""
    data_file = Path(data_file)
    lineage = {"file": str(data_file), "md5": file_md5(data_file)}
    for parent in [data_file.parent, *data_file.parents]:
        dvc_file = parent.parent / f"{parent.name}.dvc"
        if dvc_file.is_file():
            lineage.update(dvc_file=str(dvc_file), dvc_md5=dvc_md5(dvc_file.read_text()))
            break
    return lineage


def _has_remote(repo: Path) -> bool:
    from dvc.repo import Repo

    with Repo(str(repo)) as r:
        return bool(r.config.get("remote"))


def resolve_data(source: str, version: str = "", repo_dir: str | os.PathLike = ".") -> tuple[Path, dict]:
    """The input file for a pipeline run, and its lineage.

    source   "bundled" (the real PBMC default, materialised into ``repo_dir/data``) or a path to
             an .h5ad (relative paths are taken inside ``repo_dir``)
    version  "" for the workspace's data; else a git revision of ``repo_dir`` whose data.dvc
             is fetched from the DVC remote (``dvc get --rev``) into ``repo_dir/.data_versions/REV``.
    With no version and a DVC remote configured, ``dvc pull`` brings the workspace's data."""
    from cellpuzzles.core.errors import CellPuzzlesError
    from cellpuzzles.data.bundled import FILE_NAME, materialise

    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    repo = Path(repo_dir)
    rel = Path("data") / FILE_NAME if source == "bundled" else Path(source)
    if version:
        import subprocess

        if not (repo / ".dvc").is_dir():
            raise CellPuzzlesError(f"data version {version!r}: {repo} is not a DVC repository; run from the repository root")
        shown = subprocess.run(["git", "-C", str(repo), "show", f"{version}:data.dvc"], capture_output=True, text=True, check=False)
        if shown.returncode != 0:
            raise CellPuzzlesError(f"data version {version!r}: no data.dvc at that git revision of {repo}; "
                                   "give a commit or tag that tracks data/")
        dest = repo / ".data_versions" / version
        if not (dest / "data").is_dir():
            from dvc.repo import Repo

            tmp = dest.with_name(dest.name + ".partial")
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            try:
                Repo.get(str(repo.resolve()), "data", out=str(tmp / "data"), rev=version)
            except Exception as e:  # noqa: BLE001 -- DVC raises many types; the message names the cause
                raise CellPuzzlesError(f"data version {version!r}: DVC could not fetch data/ ({str(e)[:160]}); "
                                       "configure the DVC remote (dvc remote add -d ...) and dvc push") from None
            tmp.rename(dest)
        rel_in = rel.relative_to("data") if rel.parts[:1] == ("data",) else rel
        data_file = dest / "data" / rel_in
        lineage = {"file": str(data_file), "md5": file_md5(data_file), "dvc_md5": dvc_md5(shown.stdout),
                   "git_rev": version}
        return data_file, lineage
    data_file = rel if rel.is_absolute() else repo / rel
    if (repo / ".dvc").is_dir() and (repo / "data.dvc").is_file() and _has_remote(repo):
        from dvc.repo import Repo

        try:
            with Repo(str(repo)) as r:
                r.pull(targets=[str((repo / "data.dvc").resolve())])
        except Exception as e:  # noqa: BLE001 -- DVC raises many types; the message names the cause
            raise CellPuzzlesError(f"dvc pull data.dvc in {repo} failed ({str(e)[:160]}); check the DVC remote "
                                   "and its credentials, or `dvc status`") from None
    if source == "bundled" and not data_file.is_file():
        materialise(data_file.parent)
        sync_cache(repo, "data")
    if not data_file.is_file():
        raise CellPuzzlesError(f"{data_file}: data file not found; give an .h5ad path or 'bundled'")
    return data_file, data_lineage(data_file)

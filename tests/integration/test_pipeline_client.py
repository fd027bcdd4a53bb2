"""`cellpuzzles pipeline submit | schedule | schedules | unschedule` against a KFP API STAND-IN.

No Kubeflow cluster can run here, so the real CLI (a subprocess running the real
kfp.Client 2.17) talks to tests/helpers/kfp_api_standin.py, a local HTTP server answering the
v2beta1 endpoints those calls use and recording every request. The tests assert on what
kfp.Client actually sent: the inline pipeline spec, typed parameters, the cron, the
no-overlap settings and the Authorization header. Production uses the real KFP server.
"""

import os
import subprocess

import pytest
import yaml

from helpers.cli import run_cli
from helpers.kfp_api_standin import KfpApiStandin
from helpers.net import free_port
from helpers.tiny_pipeline import compile_tiny

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    return compile_tiny(tmp_path_factory.mktemp("pkg") / "tiny.yaml")


@pytest.fixture
def kfp_api():
    with KfpApiStandin(token=TOKEN) as s:
        yield s


def cli(kfp_api, *args, token=TOKEN, host=None) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess: `cellpuzzles pipeline <cmd> --host <stand-in> ...`, token in $KFP_TOKEN."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KFP_", "KF_PIPELINES"))}
    if token is not None:
        env["KFP_TOKEN"] = token
    return run_cli("pipeline", args[0], "--host", host or kfp_api.url, *args[1:], env=env, timeout=120)


def one_error_line(r) -> str:
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


# ---------------------------------------------------------------- submit ----
def test_submit_sends_spec_typed_params_and_token(kfp_api, package):
    r = cli(kfp_api, "submit", "--package", package, "--param", "data_uri=s3://b/cells.h5ad",
            "--param", "max_steps=200", "--param", "tag=007", "--param", "lr=1e-3", "--param", "dry_run=true",
            "--run-name", "nightly")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # no kfp warnings or "Run details:" noise
    [run_req] = kfp_api.calls("POST", "/runs")
    body = run_req["body"]
    assert run_req["headers"]["authorization"] == f"Bearer {TOKEN}"
    assert body["display_name"] == "nightly"
    assert body["pipeline_spec"]["pipelineInfo"]["name"] == "tiny-retrain"
    assert body["pipeline_spec"] == yaml.safe_load(package.read_text())  # the package, inline and whole
    assert body["runtime_config"]["parameters"] == {"data_uri": "s3://b/cells.h5ad", "max_steps": 200,
                                                    "tag": "007", "lr": 0.001, "dry_run": True}
    [exp] = kfp_api.experiments.values()
    assert exp["display_name"] == "cellpuzzles" and body["experiment_id"] == exp["experiment_id"]
    [run_id] = kfp_api.runs
    assert r.stdout.splitlines() == [f"run {run_id} submitted to experiment cellpuzzles at {kfp_api.url}",
                                     f"{kfp_api.url}/#/runs/details/{run_id}"]
    # a second submit reuses the experiment; --no-cache turns every task's cache off
    r = cli(kfp_api, "submit", "--package", package, "--param", "data_uri=x", "--no-cache")
    assert r.returncode == 0, r.stderr
    assert len(kfp_api.calls("POST", "/experiments")) == 1 and len(kfp_api.runs) == 2
    assert len(kfp_api.calls("GET", "/healthz")) == 2  # one health check per command
    spec = kfp_api.calls("POST", "/runs")[1]["body"]["pipeline_spec"]
    assert [t["cachingOptions"].get("enableCache", False) for t in spec["root"]["dag"]["tasks"].values()] == [False]
    assert kfp_api.calls("POST", "/runs")[1]["body"]["runtime_config"]["parameters"] == {"data_uri": "x"}


@pytest.mark.parametrize("param, expected", [
    ("epochs=3", "the pipeline has no parameter 'epochs' (it declares: data_uri, dry_run, lr, max_steps, tag)"),
    ("max_steps", "--param 'max_steps': expected KEY=VALUE"),
])
def test_bad_param_is_one_line_and_sends_nothing(kfp_api, package, param, expected):
    r = cli(kfp_api, "submit", "--package", package, "--param", "data_uri=x", "--param", param)
    assert expected in one_error_line(r)
    assert kfp_api.requests == []


def test_missing_required_param_and_missing_package(kfp_api, package, tmp_path):
    line = one_error_line(cli(kfp_api, "submit", "--package", package))
    assert "missing required pipeline parameter(s) data_uri: pass --param data_uri=VALUE" in line
    line = one_error_line(cli(kfp_api, "submit", "--package", tmp_path / "nope.yaml", "--param", "data_uri=x"))
    assert "nope.yaml: no such file" in line and "cellpuzzles pipeline compile --out" in line
    assert kfp_api.requests == []


def test_wrong_token_is_one_line_auth_error(kfp_api, package):
    line = one_error_line(cli(kfp_api, "submit", "--package", package, "--param", "data_uri=x", token="wrong"))
    assert f"KFP API at {kfp_api.url} refused the request (HTTP 401" in line and "$KFP_TOKEN" in line
    assert kfp_api.runs == {}
    line = one_error_line(cli(kfp_api, "schedules", token=None))
    assert "HTTP 401" in line


def test_login_page_instead_of_api_is_one_line(package):
    with KfpApiStandin(token=TOKEN, login_page=True) as dashboard:
        line = one_error_line(cli(dashboard, "submit", "--package", package, "--param", "data_uri=x", token=None))
        assert f"{dashboard.url}/apis/v2beta1/healthz answered with a non-API page (text/html" in line
        assert "$KFP_TOKEN" in line and dashboard.runs == {}


def test_unreachable_host_names_host_and_fix(package):
    host = f"http://127.0.0.1:{free_port()}"  # a port nobody listens on
    r = run_cli("pipeline", "submit", "--host", host, "--package", package, "--param", "data_uri=x")
    line = one_error_line(r)
    assert f"cannot reach the KFP API at {host}" in line and "KFP_HOST" in line and "port-forward" in line


def test_no_host_is_one_line(package, monkeypatch):
    monkeypatch.delenv("KFP_HOST", raising=False)
    line = one_error_line(run_cli("pipeline", "schedules"))
    assert "pass --host URL or set KFP_HOST" in line


# ---------------------------------------------------------------- schedule ----
@pytest.mark.slow
def test_schedule_lifecycle(kfp_api, package):
    args = ("schedule", "--package", package, "--param", "data_uri=s3://b/c", "--name", "weekly-retrain")
    r = cli(kfp_api, *args, "--cron", "0 3 * * 1")
    assert r.returncode == 0, r.stderr
    [req] = kfp_api.calls("POST", "/recurringruns")
    body = req["body"]
    assert req["headers"]["authorization"] == f"Bearer {TOKEN}"
    assert body["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * 1"}}  # seconds first, as KFP parses it
    assert str(body["max_concurrency"]) == "1" and body["no_catchup"] is True and body["mode"] == "ENABLE"
    assert body["display_name"] == "weekly-retrain"
    assert body["pipeline_spec"] == yaml.safe_load(package.read_text())
    assert body["runtime_config"]["parameters"] == {"data_uri": "s3://b/c"}
    [sid] = kfp_api.recurring_runs
    assert f"id {sid}" in r.stdout and f"{kfp_api.url}/#/recurringrun/details/{sid}" in r.stdout

    # same name, same cron and parameters: reported, not duplicated
    r = cli(kfp_api, *args, "--cron", "0 0 3 * * 1")
    assert r.returncode == 0 and "already exists, unchanged" in r.stdout and sid in r.stdout
    assert len(kfp_api.calls("POST", "/recurringruns")) == 1

    # same name, other cron: refused without --replace, replaced with it
    line = one_error_line(cli(kfp_api, *args, "--cron", "0 4 * * 1"))
    assert f"schedule 'weekly-retrain' already exists in experiment 'cellpuzzles' (id {sid}" in line
    assert "--replace" in line and list(kfp_api.recurring_runs) == [sid]
    r = cli(kfp_api, *args, "--cron", "0 4 * * 1", "--replace")
    assert r.returncode == 0 and "replaced" in r.stdout, r.stderr
    [new_id] = kfp_api.recurring_runs
    assert new_id != sid and kfp_api.calls("DELETE", f"/recurringruns/{sid}")
    assert kfp_api.recurring_runs[new_id]["trigger"]["cron_schedule"]["cron"] == "0 0 4 * * 1"

    # list: a header and one row with id, name, cron, status, max concurrency
    from cellpuzzles.pipelines.remote import Connection, create_schedule

    create_schedule(Connection(host=kfp_api.url, token=TOKEN), package, "daily", "@daily", {"data_uri": "x"})
    r = cli(kfp_api, "schedules")
    assert r.returncode == 0, r.stderr
    header, *rows = r.stdout.splitlines()
    assert header.split() == ["ID", "NAME", "CRON", "STATUS", "MAX_CONCURRENCY", "NO_CATCHUP"]
    assert sorted(row.split()[1] for row in rows) == ["daily", "weekly-retrain"]
    weekly = next(row for row in rows if "weekly-retrain" in row)
    assert weekly.split()[0] == new_id and "0 0 4 * * 1" in weekly and weekly.split()[-3:] == ["ENABLED", "1", "true"]

    # unschedule by name, then by id; an unknown one is one line
    r = cli(kfp_api, "unschedule", "weekly-retrain")
    assert r.returncode == 0 and new_id in r.stdout and new_id not in kfp_api.recurring_runs
    daily_id = next(iter(kfp_api.recurring_runs))
    assert cli(kfp_api, "unschedule", daily_id).returncode == 0 and kfp_api.recurring_runs == {}
    assert "no schedule 'ghost' in experiment" in one_error_line(cli(kfp_api, "unschedule", "ghost"))


def test_schedules_pages_through_the_list(kfp_api, package, monkeypatch):
    import cellpuzzles.pipelines.remote as remote

    conn = remote.Connection(host=kfp_api.url, token=TOKEN, namespace="team-a")
    for i in range(3):  # in-process: the CLI path is covered above
        remote.create_schedule(conn, package, f"s{i}", f"{i} 3 * * *", {"data_uri": "x"})
    monkeypatch.setattr(remote, "PAGE_SIZE", 2)  # force two pages
    rows = remote.list_schedules(conn)
    [exp] = kfp_api.experiments.values()
    assert exp["namespace"] == "team-a"  # multi-user mode: the experiment lives in the profile namespace
    assert [(s.name, s.cron) for s in rows] == [("s0", "0 0 3 * * *"), ("s1", "0 1 3 * * *"), ("s2", "0 2 3 * * *")]
    assert [r["query"].get("page_token") for r in kfp_api.calls("GET", "/recurringruns")][-2:] == [None, "2"]


def test_schedules_without_experiment(kfp_api):
    r = cli(kfp_api, "schedules", "--experiment", "nowhere", "--namespace", "team-a")
    assert r.returncode == 0 and "no experiment 'nowhere'" in r.stdout
    assert kfp_api.calls("POST", "/experiments") == []  # listing never creates
    [lookup] = kfp_api.calls("GET", "/experiments")
    assert lookup["query"]["namespace"] == "team-a"
    assert len(kfp_api.calls("GET", "/healthz")) == 1  # one health check, not kfp's 5 retries


def test_bad_cron_is_one_line_and_sends_nothing(kfp_api, package):
    r = cli(kfp_api, "schedule", "--package", package, "--param", "data_uri=x", "--name", "n", "--cron", "0 25 * * *")
    line = one_error_line(r)
    assert "--cron '0 25 * * *': hour field '25' is outside 0-23" in line and "seconds first" in line
    assert kfp_api.requests == []


# ---------------------------------------------------------------- compile ----
@pytest.mark.slow
def test_compile_writes_a_package_submit_accepts(tmp_path, kfp_api):
    out = tmp_path / "retrain.yaml"
    r = run_cli("pipeline", "compile", "--out", out)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"wrote {out}"
    spec, platform = yaml.safe_load_all(out.read_text())
    assert spec["pipelineInfo"]["name"] and spec["root"]["dag"]["tasks"]
    from cellpuzzles.pipelines.remote import package_inputs

    declared = package_inputs(out)
    required = [k for k, d in declared.items() if not d.get("isOptional")]
    args = [a for k in required for a in ("--param", f"{k}=x")]
    r = cli(kfp_api, "submit", "--package", out, *args)
    assert r.returncode == 0, r.stderr
    sent = kfp_api.calls("POST", "/runs")[0]["body"]["pipeline_spec"]
    assert sent == {"pipeline_spec": spec, "platform_spec": platform}  # the package, inline and whole

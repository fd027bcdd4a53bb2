"""``cellpuzzles pipeline compile | submit | schedule | schedules | unschedule``.

Connection flags (submit, schedule, schedules, unschedule): ``--host`` or ``$KFP_HOST``
(the KFP API base URL), a bearer token read from the environment variable named by
``--token-env`` (default ``KFP_TOKEN``), ``--namespace`` or ``$KFP_NAMESPACE`` (multi-user
mode), ``--ssl-ca-cert``. The Kubeflow calls live in :mod:`cellpuzzles.pipelines.remote`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from cellpuzzles.core.errors import CellPuzzlesError


def cmd_report(a) -> int:
    from cellpuzzles.pipelines.report import report

    print(report(a.summary, a.write))
    if a.write:
        print(f"\nwrote the generated block of {a.write}")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("report", help="the results table (models, baselines, RL vs SFT, provenance) from a run's summary.json")
    p.add_argument("summary", nargs="+", help="summary.json of a finished `cellpuzzles run` (several: one per seed)")
    p.add_argument("--write", default=None, metavar="FILE.md", help="also replace the generated block of this file")
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("pipeline", help="compile the retraining pipeline; submit or schedule it on Kubeflow Pipelines")
    psub = p.add_subparsers(dest="pipeline_command", required=True, metavar="{compile,submit,schedule,schedules,unschedule}")

    c = psub.add_parser("compile", help="compile the retraining pipeline to its YAML package")
    c.add_argument("--out", type=Path, default=None,
                   help="where to write the package (default: the committed pipelines/retrain.yaml)")
    c.set_defaults(fn=cmd_compile)

    s = psub.add_parser("submit", help="start one run on a KFP endpoint; prints the run id and UI link")
    _connection_args(s)
    _run_args(s)
    s.add_argument("--run-name", default=None, help="run name shown in the UI (default: pipeline name + UTC time)")
    s.set_defaults(fn=cmd_submit)

    r = psub.add_parser("schedule", help="create a recurring run (cron; one run at a time, no catch-up)")
    _connection_args(r)
    _run_args(r)
    r.add_argument("--cron", required=True,
                   help='crontab "MIN HOUR DOM MONTH DOW" (e.g. "0 3 * * 1" = Mondays 03:00 UTC; sent to KFP as '
                        '"0 0 3 * * 1", seconds first), a 6-field KFP cron, or @daily / @every 6h')
    r.add_argument("--name", required=True, help="schedule name; one schedule per name in the experiment")
    r.add_argument("--replace", action="store_true",
                   help="if a schedule with this name exists, delete it and create this one")
    r.set_defaults(fn=cmd_schedule)

    ls = psub.add_parser("schedules", help="list the recurring runs in the experiment")
    _connection_args(ls)
    ls.set_defaults(fn=cmd_schedules)

    u = psub.add_parser("unschedule", help="delete a recurring run (by id or name) from the experiment")
    _connection_args(u)
    u.add_argument("schedule", metavar="ID_OR_NAME")
    u.set_defaults(fn=cmd_unschedule)


def _connection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default=None,
                   help="KFP API base URL (default $KFP_HOST), e.g. https://kubeflow.example.com/pipeline "
                        "or http://localhost:8888 after a port-forward of svc/ml-pipeline")
    p.add_argument("--token-env", default=None, metavar="VAR",
                   help="environment variable holding the bearer token (default KFP_TOKEN; unset = no token)")
    p.add_argument("--namespace", default=None, help="profile namespace in multi-user mode (default $KFP_NAMESPACE)")
    p.add_argument("--ssl-ca-cert", default=None, metavar="FILE", help="CA bundle that signs the endpoint's TLS cert")
    p.add_argument("--experiment", default="cellpuzzles", help="KFP experiment (default cellpuzzles)")


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--package", type=Path, default=None,
                   help="compiled pipeline YAML (default: the committed pipelines/retrain.yaml)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="pipeline parameter (repeatable); VALUE is parsed as JSON when it parses, else text")
    p.add_argument("--cache", action=argparse.BooleanOptionalAction, default=None,
                   help="--no-cache turns caching off for every task; --cache forces it on for every task, "
                        "overriding tasks compiled with caching off (default: as compiled)")


def _connection(a):
    from cellpuzzles.pipelines.remote import Connection, normalise_host

    host = a.host or os.environ.get("KFP_HOST")
    if not host:
        raise CellPuzzlesError("no KFP endpoint: pass --host URL or set KFP_HOST "
                               "(e.g. http://localhost:8888 after `kubectl port-forward -n kubeflow svc/ml-pipeline 8888:8888`)")
    token_env = a.token_env or "KFP_TOKEN"
    token = os.environ.get(token_env) or None
    if a.token_env and not token:
        raise CellPuzzlesError(f"--token-env {a.token_env}: that environment variable is empty; "
                               f"export {a.token_env}=$(kubectl create token ...) or leave --token-env out")
    if a.ssl_ca_cert and not Path(a.ssl_ca_cert).is_file():
        raise CellPuzzlesError(f"--ssl-ca-cert {a.ssl_ca_cert}: no such file")
    return Connection(host=normalise_host(host), token=token, token_env=token_env,
                      namespace=a.namespace or os.environ.get("KFP_NAMESPACE") or None, ssl_ca_cert=a.ssl_ca_cert)


def _package(a) -> Path:
    if a.package is not None:
        return a.package
    try:
        from cellpuzzles.pipelines.retrain import PIPELINE_YAML
    except ImportError as e:
        raise CellPuzzlesError(f"no default pipeline package ({e}): pass --package FILE") from None
    if not Path(PIPELINE_YAML).is_file():
        raise CellPuzzlesError(f"{PIPELINE_YAML} is missing: run `cellpuzzles pipeline compile` or pass --package FILE")
    return Path(PIPELINE_YAML)


def _checked_run_inputs(a) -> tuple[Path, dict]:
    from cellpuzzles.pipelines.remote import package_inputs, parse_params

    package = _package(a)
    return package, parse_params(a.param, package_inputs(package))


def cmd_compile(a) -> int:
    try:
        from cellpuzzles.pipelines.retrain import PIPELINE_YAML, compile_pipeline
    except ImportError as e:
        raise CellPuzzlesError(f"the retraining pipeline cannot be imported ({e}); "
                               "install with the pipeline extra: pip install -e '.[pipeline]'") from None
    out = compile_pipeline(a.out if a.out is not None else PIPELINE_YAML)
    print(f"wrote {out}")
    return 0


def cmd_submit(a) -> int:
    from cellpuzzles.pipelines.remote import submit_run

    package, params = _checked_run_inputs(a)
    conn = _connection(a)
    done = submit_run(conn, package, params, experiment=a.experiment, run_name=a.run_name, enable_caching=a.cache)
    print(f"run {done.run_id} submitted to experiment {done.experiment} at {conn.host}")
    print(done.url)
    return 0


def cmd_schedule(a) -> int:
    from cellpuzzles.pipelines.remote import create_schedule, kfp_cron

    kfp_cron(a.cron)  # a bad cron fails before anything else is read or sent
    package, params = _checked_run_inputs(a)
    conn = _connection(a)
    done = create_schedule(conn, package, a.name, a.cron, params, experiment=a.experiment,
                           enable_caching=a.cache, replace=a.replace)
    s = done.schedule
    verb = {"created": "created", "replaced": "replaced", "unchanged": "already exists, unchanged:"}[done.action]
    print(f"schedule {s.name!r} {verb} id {s.schedule_id}, cron {s.cron!r} (KFP, seconds first), "
          f"max concurrency {s.max_concurrency}, no catch-up {str(s.no_catchup).lower()}, {s.status or 'status unknown'}")
    if done.action == "unchanged":
        print("  (it keeps the pipeline spec it was created with; after recompiling, pass --replace)")
    print(done.url)
    return 0


def cmd_schedules(a) -> int:
    from cellpuzzles.pipelines.remote import list_schedules

    conn = _connection(a)
    rows = list_schedules(conn, experiment=a.experiment)
    if rows is None:
        print(f"no experiment {a.experiment!r} at {conn.host}: no schedules")
        return 0
    if not rows:
        print(f"no schedules in experiment {a.experiment!r}")
        return 0
    table = [("ID", "NAME", "CRON", "STATUS", "MAX_CONCURRENCY", "NO_CATCHUP")]
    table += [(s.schedule_id, s.name, s.cron, s.status, s.max_concurrency, str(s.no_catchup).lower()) for s in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for r in table:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    return 0


def cmd_unschedule(a) -> int:
    from cellpuzzles.pipelines.remote import delete_schedule

    for s in delete_schedule(_connection(a), a.schedule, experiment=a.experiment):
        print(f"deleted schedule {s.name!r} (id {s.schedule_id}, cron {s.cron!r})")
    return 0

"""Submit and schedule the compiled pipeline on a Kubeflow Pipelines endpoint (``kfp.Client``).

Everything that can be checked without the server is checked first (package, parameters,
cron), so a bad input costs no request and leaves nothing half-created. Server and
transport failures become one :class:`CellPuzzlesError` line naming the host and the fix.

Cron: the KFP v2 backend parses schedules with ``robfig/cron`` v1 (``cron.Parse``):
6 fields, SECONDS FIRST (``sec min hour day-of-month month day-of-week``), or a
descriptor (``@daily``, ``@every 6h``). A classic 5-field crontab line handed to it
unchanged would be read as ``sec min hour dom month`` (``"0 3 * * 1"`` = every hour at
:03 in January), so :func:`kfp_cron` prefixes 5-field specs with ``"0 "``.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import yaml

from cellpuzzles.core.errors import CellPuzzlesError, short_reason
from cellpuzzles.core.options import parse_key_value

HEALTHZ_TIMEOUT_S = 15
PAGE_SIZE = 100
PORT_FORWARD_HINT = "kubectl port-forward -n kubeflow svc/ml-pipeline 8888:8888, then --host http://localhost:8888"


# ---------------------------------------------------------------- cron ----
_CRON_FIELDS = (  # robfig/cron v1 bounds and names, seconds first
    ("second", 0, 59, None),
    ("minute", 0, 59, None),
    ("hour", 0, 23, None),
    ("day-of-month", 1, 31, None),
    ("month", 1, 12, {m: i + 1 for i, m in enumerate(
        "jan feb mar apr may jun jul aug sep oct nov dec".split())}),
    ("day-of-week", 0, 6, {d: i for i, d in enumerate("sun mon tue wed thu fri sat".split())}),
)
_DESCRIPTORS = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}
_GO_DURATION = re.compile(r"^(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$")


def kfp_cron(spec: str) -> str:
    """A cron spec in the form the KFP backend expects (6 fields, seconds first).

    5 fields (classic crontab: ``min hour dom month dow``) get ``"0 "`` prefixed;
    6 fields and descriptors (``@daily``, ``@every 6h``) pass unchanged once valid.
    Raises CellPuzzlesError naming the bad field.
    """
    spec = " ".join(spec.split())
    hint = 'use 5 crontab fields "MIN HOUR DOM MONTH DOW" (e.g. "0 3 * * 1"), 6 with seconds first, or @daily / @every 6h'
    if spec.startswith("@"):
        if spec in _DESCRIPTORS or (spec.startswith("@every ") and _GO_DURATION.match(spec[len("@every "):])):
            return spec
        raise CellPuzzlesError(f"--cron {spec!r}: unknown descriptor; {hint}")
    fields = spec.split(" ") if spec else []
    if len(fields) == 5:
        fields = ["0", *fields]
    elif len(fields) != 6:
        raise CellPuzzlesError(f"--cron {spec!r}: {len(fields)} fields; {hint}")
    for text, (name, lo, hi, names) in zip(fields, _CRON_FIELDS):
        problem = _cron_field_problem(text, lo, hi, names)
        if problem:
            raise CellPuzzlesError(f"--cron {spec!r}: {name} field {text!r} {problem}; {hint}")
    return " ".join(fields)


def _cron_field_problem(field: str, lo: int, hi: int, names: dict | None) -> str | None:
    def value(tok: str) -> int | None:
        if names and tok.lower() in names:
            return names[tok.lower()]
        return int(tok) if tok.isdigit() else None

    for part in field.split(","):
        rng, _, step = part.partition("/")
        if step and (not step.isdigit() or int(step) == 0):
            return f"has a bad step {step!r}"
        if rng in ("*", "?"):
            continue
        a, _, b = rng.partition("-")
        start, end = value(a), value(b) if b else None
        if start is None or (b and end is None):
            return f"is not a number, range, list or step in {lo}-{hi}"
        end = end if end is not None else start
        if not (lo <= start <= hi and lo <= end <= hi):
            return f"is outside {lo}-{hi}"
        if start > end:
            return "has a range that runs backwards"
    return None


# ---------------------------------------------------------- package ----
def package_inputs(package: Path) -> dict[str, dict]:
    """The pipeline's declared parameters (``root.inputDefinitions.parameters``) by name."""
    package = Path(package)
    if not package.is_file():
        raise CellPuzzlesError(f"--package {package}: no such file; build it with "
                               f"`cellpuzzles pipeline compile --out {package}`")
    if package.suffix not in (".yaml", ".yml"):
        raise CellPuzzlesError(f"--package {package}: expected the compiled pipeline YAML (.yaml)")
    try:
        spec = next(yaml.safe_load_all(package.read_text()), None)
    except yaml.YAMLError as e:
        raise CellPuzzlesError(f"--package {package}: not valid YAML ({str(e).splitlines()[0]}); "
                               "recompile it with `cellpuzzles pipeline compile`") from None
    if not isinstance(spec, dict) or "root" not in spec or "pipelineInfo" not in spec:
        raise CellPuzzlesError(f"--package {package}: not a compiled KFP pipeline (no root/pipelineInfo); "
                               "recompile it with `cellpuzzles pipeline compile`")
    return dict((spec["root"].get("inputDefinitions") or {}).get("parameters") or {})


def pipeline_name(package: Path) -> str:
    spec = next(yaml.safe_load_all(Path(package).read_text()))
    return spec["pipelineInfo"]["name"]


_TYPE_CHECKS = {
    "NUMBER_INTEGER": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "NUMBER_DOUBLE": ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    "BOOLEAN": ("true or false", lambda v: isinstance(v, bool)),
    "LIST": ("a JSON list", lambda v: isinstance(v, list)),
    "STRUCT": ("a JSON object", lambda v: isinstance(v, dict)),
}


def parse_params(items: list[str], declared: dict[str, dict]) -> dict:
    """``KEY=VALUE`` strings -> pipeline arguments, checked against the declared inputs.

    A value is parsed as JSON when it parses, else kept as text; a STRING parameter always
    gets the text as typed (``tag=007`` stays ``"007"``). Unknown names, wrong types,
    repeated keys and missing required parameters are one-line errors.
    """
    params: dict = {}
    for item in items:
        key, raw = parse_key_value(item, "--param", "max_steps=200")
        if key in params:
            raise CellPuzzlesError(f"--param {key} given twice; pass each parameter once")
        if key not in declared:
            known = ", ".join(sorted(declared)) or "none"
            raise CellPuzzlesError(f"--param {key}: the pipeline has no parameter {key!r} (it declares: {known})")
        ptype = declared[key].get("parameterType", "STRING")
        if ptype == "STRING":
            params[key] = raw
            continue
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        want, ok = _TYPE_CHECKS.get(ptype, ("", lambda v: True))
        if not ok(value):
            raise CellPuzzlesError(f"--param {key}={raw}: {key} is {ptype}; give {want}")
        params[key] = float(value) if ptype == "NUMBER_DOUBLE" else value
    missing = [k for k, d in declared.items() if not d.get("isOptional") and "defaultValue" not in d and k not in params]
    if missing:
        raise CellPuzzlesError("missing required pipeline parameter(s) " + ", ".join(missing)
                               + ": pass " + " ".join(f"--param {k}=VALUE" for k in missing))
    return params


# ---------------------------------------------------------- connection ----
@dataclass(frozen=True)
class Connection:
    host: str                      # e.g. https://kubeflow.example.com/pipeline or http://localhost:8888
    token: str | None = None       # bearer token (kfp.Client existing_token)
    token_env: str = "KFP_TOKEN"   # where the token came from, for error hints
    namespace: str | None = None   # multi-user mode: the profile namespace
    ssl_ca_cert: str | None = None


def normalise_host(host: str) -> str:
    host = host.strip().rstrip("/")
    return host if host.startswith(("http://", "https://")) else "https://" + host  # kfp.Client's default


def ui_url(conn: Connection, kind: str, obj_id: str) -> str:
    """Link into the KFP UI (served at the same base URL as the API)."""
    return f"{conn.host}/#/{kind}/details/{obj_id}"


@contextlib.contextmanager
def kfp_errors(conn: Connection):
    """Turn transport and API failures into one CellPuzzlesError line naming host and fix."""
    import urllib3
    from kfp_server_api.exceptions import ApiException

    try:
        yield
    except ApiException as e:
        detail = _api_message(e)
        if e.status in (401, 403):
            raise CellPuzzlesError(
                f"KFP API at {conn.host} refused the request (HTTP {e.status}: {detail}): put a valid bearer token "
                f"in ${conn.token_env} (e.g. `kubectl create token default-editor -n <profile>`)"
                + ("" if conn.namespace else " and pass --namespace in multi-user mode")) from None
        if e.status == 0:  # TLS failures arrive as status 0
            raise CellPuzzlesError(f"TLS connection to the KFP API at {conn.host} failed ({detail}): "
                                   "pass --ssl-ca-cert FILE with the cluster's CA") from None
        raise CellPuzzlesError(f"KFP API at {conn.host} answered HTTP {e.status}: {detail}") from None
    except urllib3.exceptions.HTTPError as e:
        reason = getattr(e, "reason", None) or e
        raise CellPuzzlesError(f"cannot reach the KFP API at {conn.host} ({_reason(reason)}): check --host / KFP_HOST, "
                               f"or port-forward: {PORT_FORWARD_HINT}") from None
    except ValueError as e:  # kfp.Client's own checks (e.g. two experiments with one name)
        raise CellPuzzlesError(f"KFP at {conn.host}: {_reason(e)}") from None


def _reason(e) -> str:
    """short_reason without urllib3's connection-object prefix."""
    return short_reason(Exception(re.sub(r"<urllib3\.[^>]*>: ", "", str(e))))


def _api_message(e) -> str:
    body = e.body.decode(errors="replace") if isinstance(e.body, bytes) else (e.body or "")
    try:
        data = json.loads(body)
        return _reason(data.get("message") or data.get("error") or e.reason)
    except (ValueError, AttributeError):
        return _reason(body or e.reason or "no detail")


def connect(conn: Connection):
    """A kfp.Client for this endpoint, after one health check (``/apis/v2beta1/healthz``).

    The stock client retries a failing health check 5 times, 5 s apart, and takes a login
    page for a healthy answer; this one asks once, with a timeout, and wants JSON.
    """
    import kfp
    import kfp_server_api

    class Client(kfp.Client):
        def get_kfp_healthz(self, sleep_duration: int = 5):
            resp = self._healthz_api.healthz_service_get_healthz(
                _request_timeout=HEALTHZ_TIMEOUT_S, _preload_content=False)
            try:
                data = json.loads(resp.data)
            except ValueError:
                raise CellPuzzlesError(
                    f"{conn.host}/apis/v2beta1/healthz answered with a non-API page "
                    f"({resp.headers.get('Content-Type', 'no content type')}; a login page?): put a bearer token in "
                    f"${conn.token_env}, or point --host at the KFP API (Kubeflow dashboard URL + /pipeline)") from None
            return kfp_server_api.V2beta1GetHealthzResponse(multi_user=data.get("multi_user"))

    with kfp_errors(conn), warnings.catch_warnings(), _quiet():
        warnings.simplefilter("ignore")
        client = Client(host=conn.host, existing_token=conn.token or None,
                        namespace=conn.namespace or "kubeflow",  # kfp's "not set"
                        ssl_ca_cert=conn.ssl_ca_cert)
        if client.get_user_namespace():  # the constructor skipped its health check
            client.get_kfp_healthz()
    return client


@contextlib.contextmanager
def _quiet():
    """kfp.Client prints 'Experiment details: …' / 'Run details: …'; we print our own lines."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


# ---------------------------------------------------------- runs ----
@dataclass(frozen=True)
class Submitted:
    run_id: str
    experiment: str
    url: str


def submit_run(conn: Connection, package: Path, params: dict, experiment: str = "cellpuzzles",
               run_name: str | None = None, enable_caching: bool | None = None) -> Submitted:
    """Create (or reuse) the experiment and start one run of the package, spec inline."""
    run_name = run_name or f"{pipeline_name(package)} {datetime.now(UTC):%Y-%m-%d %H:%M:%S}"
    client = connect(conn)
    with kfp_errors(conn), _quiet():
        result = client.create_run_from_pipeline_package(
            str(package), arguments=params, run_name=run_name, experiment_name=experiment,
            namespace=conn.namespace, enable_caching=enable_caching)
    return Submitted(result.run_id, experiment, ui_url(conn, "runs", result.run_id))


# ---------------------------------------------------------- schedules ----
@dataclass(frozen=True)
class Schedule:
    schedule_id: str
    name: str
    cron: str
    status: str
    max_concurrency: str
    no_catchup: bool
    parameters: dict

    @classmethod
    def from_api(cls, rr) -> Schedule:
        trig = rr.trigger
        cron = (trig.cron_schedule.cron if trig and trig.cron_schedule
                else f"every {trig.periodic_schedule.interval_second}s" if trig and trig.periodic_schedule else "")
        return cls(rr.recurring_run_id, rr.display_name or "", cron or "", str(rr.status or ""),
                   str(rr.max_concurrency or ""), bool(rr.no_catchup),
                   dict((rr.runtime_config.parameters if rr.runtime_config else None) or {}))


def _experiment_id(client, conn: Connection, experiment: str, create: bool) -> str | None:
    with kfp_errors(conn), _quiet():
        if create:
            return client.create_experiment(name=experiment, namespace=conn.namespace).experiment_id
        try:
            return client.get_experiment(experiment_name=experiment, namespace=conn.namespace).experiment_id
        except ValueError as e:
            if str(e).startswith("No experiment is found"):
                return None
            raise


def _schedules(client, conn: Connection, experiment_id: str) -> list[Schedule]:
    out, token = [], ""
    with kfp_errors(conn):
        while True:
            page = client.list_recurring_runs(page_token=token, page_size=PAGE_SIZE, experiment_id=experiment_id)
            out += [Schedule.from_api(r) for r in page.recurring_runs or []]
            token = page.next_page_token
            if not token:
                return out


def list_schedules(conn: Connection, experiment: str = "cellpuzzles") -> list[Schedule] | None:
    """Recurring runs in the experiment; None when the experiment does not exist."""
    client = connect(conn)
    exp_id = _experiment_id(client, conn, experiment, create=False)
    return None if exp_id is None else _schedules(client, conn, exp_id)


@dataclass(frozen=True)
class Scheduled:
    schedule: Schedule
    action: str          # "created", "replaced" or "unchanged"
    url: str


def create_schedule(conn: Connection, package: Path, name: str, cron: str, params: dict,
                    experiment: str = "cellpuzzles", enable_caching: bool | None = None,
                    replace: bool = False) -> Scheduled:
    """One enabled recurring run named ``name``: max_concurrency 1, no catch-up (no overlap).

    A schedule with this name already in the experiment is left alone when its cron and
    parameters match ("unchanged"), replaced with ``replace``, else an error: never a
    second schedule with the same name.
    """
    cron = kfp_cron(cron)
    client = connect(conn)
    exp_id = _experiment_id(client, conn, experiment, create=True)
    same_name = [s for s in _schedules(client, conn, exp_id) if s.name == name]
    if same_name and not replace:
        old = same_name[0]
        if len(same_name) == 1 and old.cron == cron and old.parameters == params:
            return Scheduled(old, "unchanged", ui_url(conn, "recurringrun", old.schedule_id))
        raise CellPuzzlesError(
            f"schedule {name!r} already exists in experiment {experiment!r} (id {old.schedule_id}, cron {old.cron!r}) "
            "with a different cron or parameters: pass --replace to recreate it, or choose another --name")
    with kfp_errors(conn):
        for s in same_name:  # delete first: two live schedules could overlap
            client.delete_recurring_run(s.schedule_id)
        rr = client.create_recurring_run(
            experiment_id=exp_id, job_name=name, cron_expression=cron, max_concurrency=1, no_catchup=True,
            enabled=True, params=params, pipeline_package_path=str(package), enable_caching=enable_caching)
    new = Schedule.from_api(rr)
    return Scheduled(new, "replaced" if same_name else "created", ui_url(conn, "recurringrun", new.schedule_id))


def delete_schedule(conn: Connection, name_or_id: str, experiment: str = "cellpuzzles") -> list[Schedule]:
    """Delete the schedule(s) in the experiment with this id or name; returns what was deleted."""
    client = connect(conn)
    exp_id = _experiment_id(client, conn, experiment, create=False)
    found = [] if exp_id is None else [s for s in _schedules(client, conn, exp_id)
                                       if name_or_id in (s.schedule_id, s.name)]
    if not found:
        raise CellPuzzlesError(f"no schedule {name_or_id!r} in experiment {experiment!r}: "
                               "list them with `cellpuzzles pipeline schedules`")
    with kfp_errors(conn):
        for s in found:
            client.delete_recurring_run(s.schedule_id)
    return found

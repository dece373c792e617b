"""OpenTelemetry (runner/telemetry.py): what a real OTLP/HTTP receiver gets from the runner, and nothing when off."""

from __future__ import annotations

import gzip
import json
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote, quote_plus

import psycopg
import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (ExportMetricsServiceRequest,
                                                                          ExportMetricsServiceResponse)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (ExportTraceServiceRequest,
                                                                      ExportTraceServiceResponse)

from .conftest import (RUNNER_PASSWORD, Result, advisory_locks, assert_consistent, finish, run_runner, runner_env,
                       start_runner)
from .postgres import free_port
from .projects import Rev, chain, make_project
from .test_cli import running_query, slow_project, wait_for

ERROR = 2  # Status.STATUS_CODE_ERROR in the OTLP protobuf
TOKEN = "s3cr3t-collector-token"


class Receiver:
    """An OTLP/HTTP collector: decodes what it is sent, keeps the raw bytes; `mode` ok, refuse (503) or hang."""

    def __init__(self, mode: str = "ok") -> None:
        self.mode, self.raw, self.headers = mode, [], []
        self.traces, self.metrics = [], []
        self.release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                receiver.raw.append(body)
                receiver.headers.append(dict(self.headers))
                if receiver.mode == "hang":
                    receiver.release.wait(60)
                    return
                if receiver.mode == "refuse":
                    self.send_response(503)
                    self.end_headers()
                    return
                if self.path == "/v1/traces":
                    receiver.traces.append(ExportTraceServiceRequest.FromString(body))
                    answer = ExportTraceServiceResponse()
                else:
                    receiver.metrics.append(ExportMetricsServiceRequest.FromString(body))
                    answer = ExportMetricsServiceResponse()
                out = answer.SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def spans(self) -> list[dict]:
        found = []
        for request in self.traces:
            for resource in request.resource_spans:
                for scope in resource.scope_spans:
                    for span in scope.spans:
                        found.append({"name": span.name, "id": span.span_id.hex(),
                                      "parent": span.parent_span_id.hex(), "trace": span.trace_id.hex(),
                                      "state": span.trace_state,
                                      "error": span.status.code == ERROR, "status": span.status.message,
                                      "attributes": _attributes(span.attributes),
                                      "resource": _attributes(resource.resource.attributes)})
        return found

    def points(self, name: str) -> list[dict]:
        """The histogram data points of metric `name`: count, sum and attributes."""
        found = []
        for request in self.metrics:
            for resource in request.resource_metrics:
                for scope in resource.scope_metrics:
                    for metric in scope.metrics:
                        if metric.name == name:
                            found += [{"count": p.count, "sum": p.sum, "attributes": _attributes(p.attributes)}
                                      for p in metric.histogram.data_points]
        return found


def _value(value):
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


def _attributes(items) -> dict:
    return {item.key: _value(item.value) for item in items}


class GrpcReceiver(Receiver):
    """The same collector over OTLP/gRPC (grpcio, the otel extra's gRPC exporter's own dependency)."""

    def __init__(self) -> None:
        from concurrent import futures

        import grpc
        from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

        self.mode, self.raw, self.headers, self.traces, self.metrics = "ok", [], [], [], []
        receiver = self

        def take(found: list, request, context, answer):
            receiver.raw.append(request.SerializeToString())
            receiver.headers.append(dict(context.invocation_metadata()))
            found.append(request)
            return answer

        class Traces(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):
                return take(receiver.traces, request, context, ExportTraceServiceResponse())

        class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
            def Export(self, request, context):
                return take(receiver.metrics, request, context, ExportMetricsServiceResponse())

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), self.server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.stop(None)


@pytest.fixture
def receiver():
    found = Receiver()
    yield found
    found.close()


def otel_env(url, ini, endpoint: str, **extra) -> dict:
    return runner_env(url, ini, OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
                      OTEL_EXPORTER_OTLP_HEADERS=f"authorization=Bearer%20{TOKEN}", **extra)


def by_name(spans: list[dict]) -> dict[str, dict]:
    return {span["name"]: span for span in spans}


def assert_no_secret(receiver: Receiver, result: Result) -> None:
    """Not the database's password in any exported byte; not the collector's token in the runner's output."""
    payload = b"".join(receiver.raw)
    assert receiver.raw
    for form in {RUNNER_PASSWORD, quote(RUNNER_PASSWORD, safe=""), quote_plus(RUNNER_PASSWORD)}:
        assert form.encode() not in payload
    assert TOKEN not in result.output
    assert all(headers.get("authorization") == f"Bearer {TOKEN}" for headers in receiver.headers)


def assert_summary_last(result: Result) -> None:
    assert "exit_code" in result.last and result.last["exit_code"] == result.returncode, result


def descendants(spans: list[dict], root: dict) -> list[dict]:
    ids, found = {root["id"]}, []
    changed = True
    while changed:
        changed = False
        for span in spans:
            if span["parent"] in ids and span["id"] not in ids:
                ids.add(span["id"])
                found.append(span)
                changed = True
    return found


# -- the span tree ---------------------------------------------------------------
@pytest.mark.core  # also on SQLAlchemy 1.4 and psycopg2 in env.py: the hooks are in what both run
def test_upgrade_of_three_revisions_is_one_trace_under_the_callers(database_url, database, project, receiver):
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    result = run_runner(otel_env(database_url, project, receiver.endpoint,
                                 TRACEPARENT=f"00-{trace_id}-{parent_id}-01", TRACESTATE="vendor=x",
                                 OTEL_RESOURCE_ATTRIBUTES="k8s.pod.name=pod-1,k8s.namespace.name=ns"))
    assert result.returncode == 0, result
    assert_consistent(database_url, ["r0003"])
    assert_summary_last(result)
    assert not [r for r in result.records if r["level"] == "warning"], result
    spans = receiver.spans()
    root = by_name(spans)["migration-runner upgrade"]
    # TRACEPARENT: the run is a child of the caller's span, in its trace.
    assert (root["trace"], root["parent"]) == (trace_id, parent_id)
    assert {span["trace"] for span in spans} == {trace_id}
    assert not root["error"]
    assert root["attributes"]["migration.exit_code"] == 0
    assert root["attributes"]["migration.outcome"] == "upgraded"
    assert root["attributes"]["migration.applied"] == ["r0001", "r0002", "r0003"]
    assert root["attributes"]["db.system.name"] == "postgresql"
    assert root["attributes"]["db.namespace"] == database
    assert root["attributes"]["server.address"] == "127.0.0.1"
    assert isinstance(root["attributes"]["server.port"], int)
    assert root["resource"]["service.name"] == "migration-runner"
    assert root["resource"]["k8s.pod.name"] == "pod-1" and root["resource"]["k8s.namespace.name"] == "ns"
    children = descendants(spans, root)
    assert len(children) == len(spans) - 1  # every span is in the run's tree
    names = [span["name"] for span in children]
    for name in ("wait for the database", "acquire lock", "read state", "alembic upgrade r0001",
                 "alembic upgrade r0002", "alembic upgrade r0003", "read back"):
        assert names.count(name) == 1, names
        assert by_name(spans)[name]["parent"] == root["id"]
        assert not by_name(spans)[name]["error"]
        assert by_name(spans)[name]["attributes"]["db.namespace"] == database
    revision = by_name(spans)["alembic upgrade r0002"]["attributes"]
    assert revision["migration.revision"] == "r0002" and revision["migration.down_revisions"] == ["r0001"]
    assert by_name(spans)["read state"]["attributes"]["migration.state"] == "fresh"
    assert by_name(spans)["read back"]["attributes"]["migration.to_revisions"] == ["r0003"]
    assert by_name(spans)["acquire lock"]["attributes"]["migration.lock.key"] == str(_derived_key(database))
    # Metrics: the command, each revision, the lock wait; with the outcome.
    [command] = receiver.points("migration.command.duration")
    assert command["count"] == 1 and command["attributes"]["migration.outcome"] == "upgraded"
    assert command["attributes"]["migration.command"] == "upgrade"
    durations = receiver.points("migration.revision.duration")
    assert sorted(p["attributes"]["migration.revision"] for p in durations) == ["r0001", "r0002", "r0003"]
    assert all(p["count"] == 1 and p["attributes"]["migration.outcome"] == "upgraded" for p in durations)
    [wait] = receiver.points("migration.lock.wait")
    assert wait["count"] == 1 and wait["sum"] >= 0
    assert_no_secret(receiver, result)


def _derived_key(database: str) -> int:
    from runner.lock import derive_key

    return derive_key(database, "public", "alembic_version")


@pytest.mark.core
def test_a_failing_revision_is_an_error_span_and_the_root_an_error(database_url, tmp_path, receiver):
    revisions = chain(3)
    revisions[1].sql = ["SELECT * FROM no_such_table"]
    # A project that prints the collector's token (alone, without "Bearer"): masked like a password.
    revisions[0].python = 'import os\nprint("token", os.environ["OTEL_EXPORTER_OTLP_HEADERS"].split("%20")[1])'
    ini = make_project(tmp_path / "p", revisions)
    result = run_runner(otel_env(database_url, ini, receiver.endpoint))
    assert result.returncode == 7, result
    assert "token ***" in result.events()
    assert_consistent(database_url, [])  # the template env.py: one transaction, all rolled back
    assert_summary_last(result)
    spans = by_name(receiver.spans())
    root = spans["migration-runner upgrade"]
    assert root["parent"] == ""  # no TRACEPARENT: a trace of its own
    assert root["error"] and root["attributes"]["error.type"] == "RevisionFailed"
    assert root["attributes"]["migration.exit_code"] == 7
    assert "no_such_table" in root["status"]
    assert not spans["alembic upgrade r0001"]["error"]
    failed = spans["alembic upgrade r0002"]
    assert failed["error"] and failed["attributes"]["error.type"] == "ProgrammingError"
    assert "alembic upgrade r0003" not in spans
    points = receiver.points("migration.revision.duration")
    outcomes = {p["attributes"]["migration.revision"]: p["attributes"]["migration.revision.outcome"] for p in points}
    assert outcomes == {"r0001": "ran", "r0002": "ProgrammingError"}
    assert_no_secret(receiver, result)


def test_a_proven_baseline_and_its_stamp_are_spans(database_url, tmp_path, receiver):
    ini = make_project(tmp_path / "p", [Rev("b0001", None, ["CREATE TABLE users (id serial PRIMARY KEY)"]),
                                        Rev("b0002", "b0001", ["CREATE TABLE orders (id serial PRIMARY KEY)"])])
    with psycopg.connect(database_url, autocommit=True) as legacy:  # as an application before Alembic made it
        legacy.execute("CREATE TABLE users (id serial PRIMARY KEY)")
    result = run_runner(otel_env(database_url, ini, receiver.endpoint, MIGRATE_BASELINE_REVISION="b0001",
                                 MIGRATE_VERIFY_BASELINE="true"))
    # The output whole, as text: a fresh-clone CI run once saw exit 2 here, its message cut off in the report.
    assert result.returncode == 0, result.output[-3000:]
    spans = receiver.spans()
    root = by_name(spans)["migration-runner upgrade"]
    assert by_name(spans)["prove baseline"]["attributes"]["migration.revision"] == "b0001"
    assert by_name(spans)["stamp baseline"]["attributes"]["migration.revision"] == "b0001"
    assert [s["name"] for s in spans if s["name"].startswith("alembic")] == ["alembic upgrade b0002"]
    assert by_name(spans)["read state"]["attributes"]["migration.state"] == "legacy"
    assert all(s["parent"] == root["id"] for s in spans if s is not root)
    assert_no_secret(receiver, result)


def test_a_lock_wait_behind_another_runner_names_the_holder(database_url, tmp_path, postgres, database, receiver):
    # The first runner's revision waits for a lock the test holds: it holds the runner's lock until then.
    ini = make_project(tmp_path / "p", [Rev("r0001", None, ["SELECT pg_advisory_xact_lock(4242)",
                                                            "CREATE TABLE r_1 (id int)"])])
    with psycopg.connect(database_url, autocommit=True) as gate:
        gate.execute("SELECT pg_advisory_lock(4242)")
        first = start_runner(runner_env(database_url, ini))
        wait_for(lambda: running_query(postgres, database, "pg_advisory_xact_lock"))
        second = start_runner(otel_env(database_url, ini, receiver.endpoint))
        seen = []
        for line in second.stdout:  # until it has said whom it waits for
            seen.append(line)
            if "waiting for lock" in line:
                break
        gate.execute("SELECT pg_advisory_unlock(4242)")
    assert finish(first).returncode == 0
    second = finish(second)
    assert second.returncode == 0, (seen, second)
    assert second.last["outcome"] == "current"
    spans = by_name(receiver.spans())
    lock = spans["acquire lock"]
    assert "migration-runner" in lock["attributes"].get("migration.lock.holder", ""), (lock, seen)
    assert lock["attributes"]["migration.lock.wait"] > 0
    assert spans["migration-runner upgrade"]["attributes"]["migration.lock.wait"] > 0
    [wait] = receiver.points("migration.lock.wait")
    assert wait["sum"] > 0 and wait["attributes"]["migration.outcome"] == "current"
    assert_no_secret(receiver, second)


def test_sigterm_while_migrating_is_flushed(database_url, tmp_path, postgres, database, receiver):
    ini = slow_project(tmp_path / "p")
    proc = start_runner(otel_env(database_url, ini, receiver.endpoint))
    wait_for(lambda: running_query(postgres, database, "pg_sleep"))
    proc.send_signal(signal.SIGTERM)
    result = finish(proc, timeout=60)
    assert result.returncode == 143, result
    assert_summary_last(result)
    assert advisory_locks(postgres, database) == []
    spans = by_name(receiver.spans())
    root = spans["migration-runner upgrade"]
    assert root["error"] and root["attributes"]["error.type"] == "interrupted"
    assert root["attributes"]["migration.exit_code"] == 143
    interrupted = [s for name, s in spans.items() if name.startswith("alembic upgrade") and s["error"]]
    assert len(interrupted) == 1, spans
    assert_no_secret(receiver, result)


def test_a_configuration_error_is_traced_too(database_url, project, receiver):
    result = run_runner(otel_env(database_url, project, receiver.endpoint, MIGRATE_LOCK_TIMEOUT="soon"))
    assert result.returncode == 2, result
    assert_summary_last(result)
    [root] = receiver.spans()
    assert root["name"] == "migration-runner upgrade"
    assert root["error"] and root["attributes"]["error.type"] == "ConfigError"
    assert root["attributes"]["migration.exit_code"] == 2
    [command] = receiver.points("migration.command.duration")
    assert command["attributes"]["migration.outcome"] == "ConfigError"
    assert_no_secret(receiver, result)


def test_grpc_sends_the_same_trace_and_metrics(database_url, project):
    receiver = GrpcReceiver()
    try:
        result = run_runner(otel_env(database_url, project, receiver.endpoint, OTEL_EXPORTER_OTLP_PROTOCOL="grpc"))
    finally:
        receiver.close()
    assert result.returncode == 0, result
    assert_summary_last(result)
    assert not [r for r in result.records if r["level"] == "warning"], result
    names = [span["name"] for span in receiver.spans()]
    assert "migration-runner upgrade" in names
    assert sorted(n for n in names if n.startswith("alembic")) == [f"alembic upgrade r000{i}" for i in (1, 2, 3)]
    assert len(receiver.points("migration.revision.duration")) == 3
    assert_no_secret(receiver, result)


def test_check_is_traced_and_an_error_exactly_when_it_exits_non_zero(database_url, project, receiver):
    pending = run_runner(otel_env(database_url, project, receiver.endpoint), "check")
    assert pending.returncode == 9, pending
    assert run_runner(runner_env(database_url, project)).returncode == 0
    current = run_runner(otel_env(database_url, project, receiver.endpoint), "check")
    assert current.returncode == 0, current
    roots = [s for s in receiver.spans() if s["name"] == "migration-runner check"]
    assert [(r["error"], r["attributes"]["migration.exit_code"]) for r in roots] == [(True, 9), (False, 0)]
    assert roots[0]["attributes"]["error.type"] == "PendingRevisions" and "error.type" not in roots[1]["attributes"]
    states = [s["attributes"]["migration.state"] for s in receiver.spans() if s["name"] == "read state"]
    assert states == ["fresh", "current"]


# -- a fleet: one trace, a span per target over its runner's root ---------------------------------------
def test_a_fleet_is_one_trace_with_a_span_per_target_over_its_runners_root(postgres, tmp_path, receiver):
    from .test_fleet import databases, failing_at_2, fleet_env, targets_file

    trace_id, parent_id = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    ini = make_project(tmp_path / "p", chain(3))
    urls = databases(postgres, 3)
    failing_at_2(urls[1])  # its r0002 fails: exit 7
    names = [url.rsplit("/", 1)[1] for url in urls]
    result = run_runner(fleet_env(ini, targets_file(tmp_path / "urls", urls), MIGRATE_FLEET_CONCURRENCY="2",
                                  OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint, MIGRATE_OTEL_FLUSH_TIMEOUT="10",
                                  OTEL_EXPORTER_OTLP_HEADERS=f"authorization=Bearer%20{TOKEN}",
                                  TRACEPARENT=f"00-{trace_id}-{parent_id}-01", TRACESTATE="vendor=x"), timeout=300)
    assert result.returncode == 7, result
    assert_summary_last(result)
    spans = receiver.spans()
    assert spans, (result, receiver.raw)
    # One trace, the CI job's: the fleet's root under its span, every other span under the fleet's root.
    assert {span["trace"] for span in spans} == {trace_id}
    [fleet] = [span for span in spans if span["parent"] == parent_id]
    assert fleet["name"] == "migration-runner upgrade"
    assert len(descendants(spans, fleet)) == len(spans) - 1
    assert fleet["error"] and fleet["attributes"]["error.type"] == "TargetsFailed"
    assert fleet["attributes"]["migration.exit_code"] == 7
    # A span per target in the fleet process, each the parent of exactly one runner's root.
    targets = [span for span in spans if span["parent"] == fleet["id"]]
    assert sorted(span["name"] for span in targets) == sorted(f"target {name}" for name in names)
    by_database = {span["attributes"]["db.namespace"]: span for span in targets}
    for position, name in enumerate(names):
        target = by_database[name]
        assert target["attributes"]["migration.fleet.position"] == position
        label = target["attributes"]["migration.fleet.target"]
        assert label == f"postgresql://127.0.0.1:{postgres.port}/{name}", label  # not the user, nor the password
        assert target["attributes"]["server.port"] == postgres.port
        [root] = [span for span in spans if span["parent"] == target["id"]]
        assert root["name"] == "migration-runner upgrade" and root["attributes"]["db.namespace"] == name
        assert root["state"] == "vendor=x"  # the caller's TRACESTATE, carried with the fleet's TRACEPARENT
        assert {span["name"] for span in descendants(spans, root)} >= {"acquire lock", "read state"}
        code = 7 if position == 1 else 0
        for span in (target, root):
            assert span["attributes"]["migration.exit_code"] == code, span
            assert span["error"] == (code != 0), span
        if code:
            assert target["attributes"]["migration.outcome"] == "RevisionFailed"
            assert target["attributes"]["error.type"] == "RevisionFailed" and "r0002" in target["status"]
            failed = [span for span in descendants(spans, root) if span["error"]]
            assert [span["name"] for span in failed] == ["alembic upgrade r0002"]
        else:
            assert target["attributes"]["migration.outcome"] == "upgraded" and not target["status"]
            assert "error.type" not in target["attributes"]
            assert_consistent(urls[position], ["r0003"])
    assert_no_secret(receiver, result)


# -- a collector that is not there, refuses, or hangs ------------------------------------------------
@pytest.mark.parametrize("mode", ["refuse", "hang", "down"])
def test_a_collector_down_refusing_or_hanging_costs_one_warning(database_url, project, mode):
    collector = Receiver("ok" if mode == "down" else mode)
    endpoint = f"http://127.0.0.1:{free_port()}" if mode == "down" else collector.endpoint
    try:
        started = time.monotonic()
        result = run_runner(otel_env(database_url, project, endpoint, MIGRATE_OTEL_FLUSH_TIMEOUT="0.5"), timeout=60)
        elapsed = time.monotonic() - started
    finally:
        collector.close()
    assert result.returncode == 0, result
    assert_consistent(database_url, ["r0003"])
    assert_summary_last(result)
    warnings = [r for r in result.records if r["level"] in ("warning", "error")]
    assert len(warnings) == 1, result
    assert "not sent to the OpenTelemetry collector" in warnings[0]["event"]
    # Bounded: the collector holds a request for 60 s; the runner gives it MIGRATE_OTEL_FLUSH_TIMEOUT.
    assert warnings[0]["seconds"] < 5 and elapsed < 45, (warnings, elapsed)
    assert TOKEN not in result.output
    if mode != "down":
        assert collector.raw  # it was tried


# -- off: nothing imported, nothing changed ------------------------------------------------
IMPORTED = """
import json, sys
from runner import cli
code = cli.main()
sys.__stdout__.write(json.dumps({"code": code,
                                 "modules": sorted(m for m in sys.modules if m.startswith("opentelemetry"))}))
"""


def _in_process(env: dict, prelude: str = "") -> tuple[int, list[str]]:
    proc = subprocess.run([sys.executable, "-c", prelude + IMPORTED], env=env, capture_output=True, text=True,
                          timeout=120)
    answer = json.loads(proc.stdout.strip().splitlines()[-1])
    return answer["code"], answer["modules"]


def test_without_an_endpoint_nothing_of_opentelemetry_is_imported(postgres, tmp_path, receiver):
    urls = [postgres.url(name, "runner", RUNNER_PASSWORD) for name in _databases(postgres, 4)]
    ini = make_project(tmp_path / "p", chain(2))
    assert _in_process(runner_env(urls[0], ini)) == (0, [])
    assert _in_process(otel_env(urls[1], ini, receiver.endpoint, OTEL_SDK_DISABLED="true")) == (0, [])
    assert _in_process(otel_env(urls[2], ini, receiver.endpoint, OTEL_TRACES_EXPORTER="none",
                                OTEL_METRICS_EXPORTER="none")) == (0, [])
    # The control: with an endpoint it is imported and used.
    code, modules = _in_process(otel_env(urls[3], ini, receiver.endpoint))
    assert code == 0 and "opentelemetry.sdk.trace" in modules
    assert receiver.spans()


def test_an_endpoint_without_the_extra_is_a_warning(database_url, project, receiver):
    hide = "import sys\nsys.modules['opentelemetry'] = None  # as if the otel extra were not installed\n"
    env = otel_env(database_url, project, receiver.endpoint)
    proc = subprocess.run([sys.executable, "-c", hide + IMPORTED], env=env, capture_output=True, text=True,
                          timeout=120)
    assert json.loads(proc.stdout.strip().splitlines()[-1])["code"] == 0, proc.stderr
    warnings = [json.loads(line) for line in proc.stderr.splitlines() if '"warning"' in line]
    assert len(warnings) == 1 and "otel extra is not installed" in warnings[0]["event"], proc.stderr
    assert_consistent(database_url, ["r0003"])
    assert receiver.raw == []


def _databases(postgres, n: int) -> list[str]:
    import uuid

    names = [f"t_{uuid.uuid4().hex[:12]}" for _ in range(n)]
    for name in names:
        postgres.create_database(name, "runner")
    return names

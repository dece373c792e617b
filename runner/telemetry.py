"""OpenTelemetry traces and metrics of a run, sent over OTLP when an endpoint is configured (the `otel` extra).

Configured only by OpenTelemetry's own variables (OTEL_EXPORTER_OTLP_ENDPOINT and
the per-signal ones, OTEL_EXPORTER_OTLP_PROTOCOL, _HEADERS, OTEL_SERVICE_NAME,
OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_EXPORTER/OTEL_METRICS_EXPORTER,
OTEL_SDK_DISABLED) and TRACEPARENT/TRACESTATE, which make the run's root span a
child of the caller's trace. With no endpoint (or without the extra) nothing of
OpenTelemetry is imported and every hook below is one test of a global.

Spans and metrics are kept in memory during the run and sent once, at the end,
before the summary: the run never waits on a collector while it migrates, the
export is bounded by MIGRATE_OTEL_FLUSH_TIMEOUT, a collector that refuses or
hangs costs one warning line and never the exit code, and nothing is printed
after the summary, which stays the last line.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator
from urllib.parse import unquote

logger = logging.getLogger("runner.telemetry")

PREFIX = "migration."
DEFAULT_FLUSH_TIMEOUT = 1.0
SERVICE_NAME = "migration-runner"
# Seconds: a revision takes milliseconds to hours; the SDK's default buckets are for milliseconds.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class _Run:
    """The SDK objects of one run, the root span and what the metrics record at the end."""

    def __init__(self, traces, metrics) -> None:
        from opentelemetry import context, trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        from . import package_version

        version = package_version()
        resource = Resource.create({"service.version": version})
        if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
            # Neither OTEL_SERVICE_NAME nor OTEL_RESOURCE_ATTRIBUTES named it.
            resource = resource.merge(Resource({"service.name": SERVICE_NAME}))
        self.span_exporter, self.metric_exporter = traces, metrics  # classes
        self.memory = InMemorySpanExporter()
        self.tracer_provider = TracerProvider(resource=resource)
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.memory))
        # Not the global provider: a project's env.py instrumented with OpenTelemetry keeps its own.
        self.tracer = self.tracer_provider.get_tracer("runner", version)
        self.reader = self.meter_provider = None
        if metrics is not None:
            from opentelemetry.sdk.metrics import MeterProvider
            from opentelemetry.sdk.metrics.export import InMemoryMetricReader

            self.reader = InMemoryMetricReader()
            self.meter_provider = MeterProvider(metric_readers=[self.reader], resource=resource)
        carrier = {key.lower(): os.environ[key] for key in ("TRACEPARENT", "TRACESTATE") if os.environ.get(key)}
        parent = TraceContextTextMapPropagator().extract(carrier)
        self.root = self.tracer.start_span(SERVICE_NAME, context=parent)
        self.token = context.attach(trace.set_span_in_context(self.root))
        self.database: dict = {}  # db.* attributes, once a URL is known; every later span carries them
        self.revisions: list[tuple[float, dict]] = []  # (seconds, attributes) of each revision run


_run: _Run | None = None


def _enabled(signal: str) -> bool:
    """Whether OTEL_<signal>_EXPORTER and the endpoints ask for this signal over OTLP."""
    exporter = os.environ.get(f"OTEL_{signal}_EXPORTER", "otlp").strip().lower() or "otlp"
    endpoint = (os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
                or os.environ.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT", "").strip())
    if not endpoint or exporter == "none":
        return False
    if exporter != "otlp":
        logger.warning("OTEL_%s_EXPORTER=%s is not supported (only otlp and none): no %s exported",
                       signal, exporter, signal.lower())
        return False
    return True


def start() -> None:
    """Begin the run's root span, if an OTLP endpoint is configured; else do nothing, importing nothing."""
    global _run
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return
    wanted = [signal for signal in ("TRACES", "METRICS") if _enabled(signal)]
    if not wanted:
        return
    for value in _header_values():  # bearer tokens, API keys: masked like a password
        _log().add_secret(value)
    try:
        exporters = {signal: _exporter(signal) for signal in wanted}  # a wrong protocol is said now
        _run = _Run(exporters.get("TRACES"), exporters.get("METRICS"))
    except ImportError as e:
        logger.warning("an OTLP endpoint is configured, but the otel extra is not installed "
                       "(pip install 'migration-runner[otel]', or build the image with EXTRAS=otel): %s; "
                       "no traces or metrics", e)
    except Exception as e:  # a malformed OTEL_ variable: the run goes on without telemetry
        logger.warning("telemetry off: %s: %s", type(e).__name__, _log().redact(str(e)))


def _log():
    from . import log

    return log


def _header_values() -> list[str]:
    """Every header value, as given and decoded, and the token alone of `Bearer <token>`."""
    values = []
    for key in ("OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_METRICS_HEADERS"):
        for item in os.environ.get(key, "").split(","):
            if "=" in item:
                value = item.split("=", 1)[1].strip()
                values += [value, unquote(value), *unquote(value).split()[1:]]
    return values


def _exporter(signal: str):
    """The class of OTLP exporter OTEL_EXPORTER_OTLP_(<signal>_)PROTOCOL names; it reads the endpoint and headers
    itself, and is made at exit with the flush timeout as its own (its retries end with it)."""
    protocol = (os.environ.get(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL", "").strip()
                or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "").strip() or "http/protobuf").lower()
    if protocol == "grpc":
        if signal == "TRACES":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as Exporter
        else:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as Exporter
    elif protocol == "http/protobuf":
        if signal == "TRACES":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as Exporter
        else:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as Exporter
    else:
        raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol} is not supported (http/protobuf or grpc)")
    return Exporter


# -- hooks: each a no-op when off ----------------------------------------------------
def database(url) -> dict:
    """The database's attributes (semantic conventions; never the user or password), also given to the root and
    every later span."""
    if _run is None or url is None:
        return {}
    _run.database = database_attributes(url)
    return _run.database


def database_attributes(url) -> dict:
    """The semantic conventions' attributes of the database `url` names: never its user or password."""
    attributes = {"db.system.name": "postgresql"}
    if url.database:
        attributes["db.namespace"] = url.database
    host = url.host or url.query.get("host")
    if isinstance(host, tuple):  # several hosts: libpq picks one
        host = ",".join(host)
    if host:
        attributes["server.address"] = host
    if url.port:
        attributes["server.port"] = url.port
    return attributes


@contextmanager
def span(name: str, attributes: dict | None = None) -> Iterator[Callable[[dict], None]]:
    """A child span of the current one around the body; an exception escaping it makes it an error.

    Yields a function that adds attributes to it."""
    if _run is None:
        yield _ignore
        return
    with _run.tracer.start_as_current_span(name, attributes={**_run.database, **_clean(attributes or {})},
                                           record_exception=False, set_status_on_exception=False) as current:
        try:
            yield lambda more: current.set_attributes(_clean(more))
        except BaseException as e:
            _error(current, type(e).__name__, str(e))
            raise


def _ignore(attributes: dict) -> None:
    pass


def traced(name: str, attributes: Callable[..., dict] | None = None, result: Callable[[object], dict] | None = None):
    """A decorator: each call of the function in a span `name`; `attributes(*args, **kwargs)` and `result(value)`
    give its attributes."""

    def decorate(function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            if _run is None:
                return function(*args, **kwargs)
            with span(name, attributes(*args, **kwargs) if attributes else None) as annotate:
                value = function(*args, **kwargs)
                if result is not None:
                    annotate(result(value))
                return value

        return wrapper

    return decorate


def annotate(attributes: dict) -> None:
    """Add attributes to the current span (the lock's holder while it waits, say)."""
    if _run is None:
        return
    from opentelemetry import trace

    trace.get_current_span().set_attributes(_clean(attributes))


def mark(name: str, attributes: dict) -> None:
    """A span of no duration: a step done inside another (a baseline stamp, written with the upgrade's first step)."""
    with span(name, attributes):
        pass


def open_span(name: str, attributes: dict | None = None):
    """A child of the current span that stays open, without becoming current, until `close_span`: one of
    several at once (a fleet's targets in flight). None when off."""
    if _run is None:
        return None
    return _run.tracer.start_span(name, attributes={**_run.database, **_clean(attributes or {})})


def close_span(span, attributes: dict | None = None, error: tuple[str, str] | None = None) -> None:
    """End a span of `open_span` with more attributes; `error` (type, message) makes it an error."""
    if span is None:
        return
    span.set_attributes(_clean(attributes or {}))
    if error is not None:
        _error(span, *error)
    span.end()


def propagation(span=None) -> dict[str, str]:
    """TRACEPARENT (and TRACESTATE, if any) naming `span`, else the current span, for a child process's
    environment (OpenTelemetry's environment-variable carrier, which `start` reads): the child's root span is
    then its child, in this trace. {} when this run exports no traces: the child's environment stays as it is."""
    if _run is None or _run.span_exporter is None:
        return {}
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, context=None if span is None else trace.set_span_in_context(span))
    return {key.upper(): value for key, value in carrier.items() if key in ("traceparent", "tracestate")}


def recording() -> bool:
    """Whether this run traces (OTEL_ configured): without, `revision` is a no-op its caller may skip."""
    return _run is not None


@contextmanager
def revision(script, verb: str) -> Iterator[None]:
    """The span of one revision's upgrade() (verb "ran") or downgrade(), timed for the revision histogram."""
    if _run is None:
        yield
        return
    direction = "downgrade" if verb == "reverted" else "upgrade"
    down = script.down_revision
    attributes = {f"{PREFIX}revision": script.revision, f"{PREFIX}direction": direction,
                  f"{PREFIX}down_revisions": [down] if isinstance(down, str) else list(down or ())}
    started = time.monotonic()
    failed = None
    try:
        with span(f"alembic {direction} {script.revision}", attributes):
            yield
    except BaseException as e:
        failed = type(e).__name__
        raise
    finally:
        _run.revisions.append((time.monotonic() - started,
                               {**attributes, f"{PREFIX}revision.outcome": failed or "ran"}))


def finish(report, code: int, settings=None) -> None:
    """End the root span with the command's outcome, record the metrics and send everything, within the flush
    timeout; before the summary, which stays the last line. Never raises."""
    global _run
    run, _run = _run, None
    if run is None:
        return
    try:
        _finish(run, report, code, _flush_timeout(settings))
    except BaseException as e:  # a SIGTERM during the flush, a bug here: the exit code stands
        logger.warning("telemetry not sent: %s", _log().redact(f"{type(e).__name__}: {e}"))
    # Whatever the exporters' threads still do after the timeout, they print nothing after the summary.
    logging.getLogger("opentelemetry").setLevel(logging.CRITICAL + 1)
    logging.getLogger("opentelemetry").propagate = False


def _flush_timeout(settings) -> float:
    if settings is not None:
        return settings.otel_flush_timeout
    try:  # the settings were invalid: the variable as given, if it is a number
        value = float(os.environ.get("MIGRATE_OTEL_FLUSH_TIMEOUT", DEFAULT_FLUSH_TIMEOUT))
        return value if value > 0 else DEFAULT_FLUSH_TIMEOUT
    except ValueError:
        return DEFAULT_FLUSH_TIMEOUT


def _finish(run: _Run, report, code: int, timeout: float) -> None:
    from opentelemetry import context

    duration = time.monotonic() - report.started
    outcome = {f"{PREFIX}command": report.command, f"{PREFIX}outcome": report.outcome}
    root = run.root
    root.update_name(f"{SERVICE_NAME} {report.command}")
    root.set_attributes({**run.database, **outcome, f"{PREFIX}exit_code": code,
                         f"{PREFIX}from_revisions": list(report.from_revision),
                         f"{PREFIX}to_revisions": list(report.to_revision),
                         f"{PREFIX}applied": list(report.applied), f"{PREFIX}reverted": list(report.reverted)})
    if report.target:
        root.set_attribute(f"{PREFIX}target", report.target)
    if report.lock_wait is not None:
        root.set_attribute(f"{PREFIX}lock.wait", report.lock_wait)
    if code != 0:  # exactly then: a revision retried after a lock_timeout is an error, the command may not be
        _error(root, report.outcome, report.message)
    root.end()
    context.detach(run.token)
    if run.meter_provider is not None:
        meter = run.meter_provider.get_meter("runner")
        common = {**_scope(run.database), **outcome}
        _histogram(meter, f"{PREFIX}command.duration", "Duration of a migration-runner command").record(
            duration, common)
        if report.lock_wait is not None:
            _histogram(meter, f"{PREFIX}lock.wait", "Time waited for the advisory lock").record(
                report.lock_wait, common)
        revisions = _histogram(meter, f"{PREFIX}revision.duration", "Duration of one revision's upgrade() or "
                               "downgrade()")
        for seconds, attributes in run.revisions:
            # Not the down revisions: a metric's dimensions are what one aggregates by.
            attributes = {k: v for k, v in attributes.items() if k != f"{PREFIX}down_revisions"}
            revisions.record(seconds, {**common, **attributes})
    _send(run, timeout)


def _scope(database: dict) -> dict:
    # The metrics' dimensions: which database, not which host of several.
    return {key: database[key] for key in ("db.system.name", "db.namespace") if key in database}


def _histogram(meter, name: str, description: str):
    try:
        return meter.create_histogram(name, unit="s", description=description,
                                      explicit_bucket_boundaries_advisory=list(BUCKETS))
    except TypeError:  # an SDK before 1.23, without the advisory
        return meter.create_histogram(name, unit="s", description=description)


def _send(run: _Run, timeout: float) -> None:
    """Export the spans and the metrics in a thread given `timeout` seconds; a failure is one warning line."""
    problems: list[str] = []
    # The exporters log their own failures, several lines with retries: collected here, said once.
    collected = _Collector()
    otel_logger = logging.getLogger("opentelemetry")
    otel_logger.addHandler(collected)
    otel_logger.propagate = False
    for name, each in list(logging.Logger.manager.loggerDict.items()):
        # env.py's fileConfig disables loggers it does not name, the exporters' among them.
        if name.startswith("opentelemetry") and isinstance(each, logging.Logger):
            each.disabled = False

    def export() -> None:
        try:
            if run.span_exporter is not None:
                spans = run.memory.get_finished_spans()
                if spans and run.span_exporter(timeout=timeout).export(spans).name != "SUCCESS":
                    problems.append("traces not taken")
                    return  # the same collector: its metrics exporter would only retry until the timeout
            if run.metric_exporter is not None:
                data = run.reader.get_metrics_data()
                if data is not None and run.metric_exporter(timeout=timeout).export(
                        data, timeout_millis=timeout * 1000).name != "SUCCESS":
                    problems.append("metrics not taken")
        except Exception as e:
            problems.append(f"{type(e).__name__}: {e}")

    sender = threading.Thread(target=export, name="otel-export", daemon=True)
    started = time.monotonic()
    sender.start()
    sender.join(timeout)
    if sender.is_alive():
        problems.append(f"the collector did not answer within {timeout:g}s (MIGRATE_OTEL_FLUSH_TIMEOUT)")
    otel_logger.removeHandler(collected)
    if problems:
        detail = "; ".join(problems + collected.messages[:1])
        logger.warning("traces and metrics not sent to the OpenTelemetry collector: %s", _log().redact(detail),
                       extra={"seconds": round(time.monotonic() - started, 3)})


class _Collector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage().split("\n", 1)[0][:300])


def _error(span, error_type: str, message: str) -> None:
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute("error.type", error_type)
    span.set_status(Status(StatusCode.ERROR, _log().redact(message.split("\n", 1)[0])[:500]))


def _clean(attributes: dict) -> dict:
    """Attributes as OpenTelemetry takes them: no None, sequences as lists of strings, every string masked."""
    redact = _log().redact
    clean = {}
    for key, value in attributes.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple, set, frozenset)):
            value = [redact(str(item)) for item in value]
        elif isinstance(value, str):
            value = redact(value)
        elif not isinstance(value, (bool, int, float)):
            value = redact(str(value))
        clean[key] = value
    return clean

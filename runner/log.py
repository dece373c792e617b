"""Logging: text or JSON lines on stderr, with every known secret masked.

The project's logging configuration takes effect as under plain alembic: the
`fileConfig`, `dictConfig` or `basicConfig` that env.py (or anything it
imports) calls configures the project's loggers, handlers, levels and filters
for real, and `disable_existing_loggers` applies to its loggers. Right after
each such call, and again before the runner writes anything that matters,
the runner takes back its own loggers: the runner's and alembic's carry our
handler only and do not propagate, so their lines go out exactly once, masked,
in MIGRATE_LOG_FORMAT, and a project handler on the root logger can neither
silence them nor print them a second time. The root logger is left without a
handler, as alembic's CLI leaves it, so a project's `basicConfig` works as
there; records no handler takes go out through our last-resort handler.
Anything written straight to stdout/stderr (a `print`, or a project handler
writing to `sys.stderr`) goes through the same masking and, in JSON mode,
becomes a JSON line like the rest.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import logging.config
import re
import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator
from urllib.parse import quote, quote_plus

logger = logging.getLogger("runner")

_secrets: set[str] = set()
# Credentials in any URL-ish text, and `password=` in a query string or conninfo.
# An encoded password may hold spaces and quotes; the first raw "@" ends it.
_URL_CREDENTIALS = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@]+?@", re.IGNORECASE)
_PASSWORD_PARAM = re.compile(r"(\bpassword\s*=\s*)('[^']*'|[^&\s'\"]+)", re.IGNORECASE)
MASK = "***"
_format = "text"


def add_url_secrets(url) -> None:
    """Mask a SQLAlchemy URL's password, in its user info or its query (?password=), from now on."""
    for secret in (url.password, url.query.get("password")):
        if isinstance(secret, str):
            add_secret(secret)


def add_secret(secret: str | None) -> None:
    """Mask this value, raw and percent-encoded, in all output from now on."""
    global _secret_pattern
    if secret:
        # Here, not at the top: the no-op proven without SQLAlchemy (fastpath) must not import it.
        from sqlalchemy.engine import URL

        # SQLAlchemy percent-encodes fewer characters than urllib does.
        rendered = URL.create("x", username="u", password=secret).render_as_string(hide_password=False)
        sqlalchemy_form = rendered.removeprefix("x://u:").removesuffix("@")
        _secrets.update({secret, quote(secret, safe=""), quote_plus(secret), sqlalchemy_form} - {""})
        # Whole tokens only: a short password must not mask the "p" of every "upgrade". One of
        # fewer than 4 characters is masked only where it stands as a password (URL, password=).
        alternatives = "|".join(re.escape(s) for s in sorted(_secrets, key=len, reverse=True) if len(s) >= 4)
        if alternatives:
            _secret_pattern = re.compile(rf"(?<![A-Za-z0-9])(?:{alternatives})(?![A-Za-z0-9])")


_secret_pattern: re.Pattern | None = None


def redact(text: str) -> str:
    """The text with every registered secret and URL credential masked."""
    if _secret_pattern is not None:
        text = _secret_pattern.sub(MASK, text)
    # Each pattern only where it can match (a URL has "://", a password parameter "="): two lines a revision
    # go through here, and most carry neither.
    if "://" in text:
        text = _URL_CREDENTIALS.sub(rf"\g<1>{MASK}@", text)
    if "=" in text:
        text = _PASSWORD_PARAM.sub(rf"\g<1>{MASK}", text)
    return text


class JsonFormatter(logging.Formatter):
    """One JSON object a record: time, level, logger, event, and any `extra` fields."""

    _standard = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
    # One encoder for every line: json.dumps(default=...) would build a new one per call.
    _encoder = json.JSONEncoder(default=lambda value: redact(str(value)))
    _second: tuple[int, str] = (-1, "")  # the last whole second formatted, and its text

    def _time(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second[0]:  # strftime once a second, not once a line (two lines a revision)
            self._second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
        return f"{self._second[1]}.{int(record.msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self._time(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": redact(record.getMessage()),
        }
        for key, value in vars(record).items():
            if key not in self._standard and not key.startswith("_"):
                entry[key] = redact_values(value)
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        # Values only are masked: a short secret must not corrupt the keys.
        return self._encoder.encode(entry)


def redact_values(value):
    """`value` with every string in it masked (dicts, lists and tuples walked)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_values(v) for v in value]
    return value


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        text = redact(super().format(record))
        if record.name.startswith("alembic") and "\n" in text and not record.exc_info:
            # "Running upgrade a -> b, <message>": a message of several lines, its first line only.
            text = text.split("\n", 1)[0] + " ..."
        return text


class _LineWriter(io.TextIOBase):
    """A stdout/stderr stand-in that sends each complete line through logging."""

    def __init__(self, name: str, level: int, original) -> None:
        self._logger = logging.getLogger(name)
        self._level = level
        self._buffer = ""
        self._original = original

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._buffer += text
        *lines, self._buffer = self._buffer.split("\n")
        for line in lines:
            if line.strip():
                self._log(line.rstrip())
        return len(text)

    def _log(self, line: str) -> None:
        if getattr(_writing, "active", False):
            # Written while a line is being logged (a handler of the project's own on this
            # stream): hand it to our handler directly rather than loop through logging.
            _handler.handle(logging.makeLogRecord({"name": self._logger.name, "levelno": self._level,
                                                   "levelname": logging.getLevelName(self._level), "msg": line}))
            return
        _writing.active = True
        try:
            self._logger.log(self._level, line)
        finally:
            _writing.active = False

    def flush(self) -> None:
        self._original.flush()

    def fileno(self) -> int:
        return self._original.fileno()

    def isatty(self) -> bool:
        return self._original.isatty()


def _then_reclaim(configure):
    """The project's logging configuration function, followed by taking our loggers back."""

    @functools.wraps(configure)
    def configure_then_reclaim(*args, **kwargs):
        try:
            return configure(*args, **kwargs)
        finally:
            restore()

    configure_then_reclaim.reclaims = True
    return configure_then_reclaim


_writing = threading.local()
_handler: logging.Handler = logging.NullHandler()
# Loggers whose records are ours to show, whatever the project configures.
OWN_LOGGERS = ("runner", "alembic", "stdout", "stderr")
_level = "INFO"


def setup(fmt: str | None = None, level: str = "INFO") -> str:
    """Send the runner's logging to stderr as text or JSON; returns the format chosen."""
    global _format, _handler, _level
    stream = sys.__stderr__
    fmt = _format = fmt or ("text" if stream.isatty() else "json")
    _level = level
    formatter = JsonFormatter() if fmt == "json" else TextFormatter()
    _handler = logging.StreamHandler(stream)
    _handler.setFormatter(formatter)
    # Records of loggers nobody configured (a project's warning, py.warnings) in our format too.
    last_resort = logging.StreamHandler(stream)
    last_resort.setLevel(logging.WARNING)
    last_resort.setFormatter(formatter)
    logging.lastResort = last_resort
    root = logging.getLogger()
    # As alembic's CLI leaves it: no handler, so that a project's basicConfig does what it does there.
    root.handlers[:] = [h for h in root.handlers if not getattr(h, "runner_owned", False)]
    _handler.runner_owned = last_resort.runner_owned = True
    restore()
    logging.captureWarnings(True)
    for module, name in ((logging.config, "fileConfig"), (logging.config, "dictConfig"), (logging, "basicConfig")):
        if not getattr(getattr(module, name), "reclaims", False):
            setattr(module, name, _then_reclaim(getattr(module, name)))
    sys.stdout = _LineWriter("stdout", logging.INFO, sys.__stdout__)
    sys.stderr = _LineWriter("stderr", logging.WARNING, sys.__stderr__)
    return fmt


def restore() -> None:
    """Our loggers back as ours, whatever the project did to them meanwhile; the project's own stay as it set them."""
    logging.disable(logging.NOTSET)
    for name, own in list(logging.Logger.manager.loggerDict.items()):
        # A child of ours (runner.lock, alembic.runtime.migration) a project's config disabled.
        if isinstance(own, logging.Logger) and name.split(".", 1)[0] in OWN_LOGGERS:
            own.disabled = False
    for name in OWN_LOGGERS:
        own = logging.getLogger(name)
        own.handlers[:] = [_handler]
        own.propagate = False
        own.setLevel(_level)
        own.disabled = False


def chosen_format() -> str:
    """The format `setup` chose: text or json."""
    return _format


def summary(level: int, fields: dict) -> None:
    """A command's last line: its message with the fields, as one JSON object in JSON mode."""
    message = fields["message"]
    restore()
    rest = {k: v for k, v in fields.items() if k != "message"}
    if _format == "json":
        record = logger.makeRecord(logger.name, level, __file__, 0, "%s", (message,), None, extra=rest)
    else:
        record = logger.makeRecord(logger.name, level, __file__, 0, "%s %s", (message, json.dumps(rest)), None)
    # handle(), not log(): the last line is written whatever MIGRATE_LOG_LEVEL filters.
    logger.handle(record)


@contextmanager
def hushed(*names: str) -> Iterator[None]:
    """Inside the `with`, the loggers `names` and their children write only warnings and worse.

    At our handler, not by the loggers' levels: the project's fileConfig or dictConfig, run by env.py
    meanwhile, sets every existing logger under the ones it configures back to NOTSET."""
    prefixes = tuple(name + "." for name in names)

    def loud_enough(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not (record.name in names or record.name.startswith(prefixes))

    _handler.addFilter(loud_enough)
    try:
        yield
    finally:
        _handler.removeFilter(loud_enough)


@contextmanager
def unheard_imports():
    """Import the heavy modules without the INFO records they log as they load.

    alembic logs the setup of each of its plugins at INFO on its first import. Under
    alembic's own CLI that happens before logging is configured, so nobody sees it;
    the runner imports alembic lazily, after its handler is in place, and would
    print them. Warnings still pass.
    """
    previous = logging.root.manager.disable
    logging.disable(logging.INFO)
    try:
        yield
    finally:
        logging.disable(previous)


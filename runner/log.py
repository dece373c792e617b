"""Logging: text or JSON lines on stderr, with every known secret masked.

The runner owns the process's logging. alembic's generic env.py calls
``logging.config.fileConfig``, which would replace our handlers and disable
our loggers mid-run, so that call is neutralised here; and anything written
straight to stdout/stderr (a ``print`` in env.py) goes through the same masking
and, in JSON mode, becomes a JSON line like the rest.
"""

from __future__ import annotations

import io
import json
import logging
import logging.config
import re
import sys
import time
from urllib.parse import quote, quote_plus

from sqlalchemy.engine import URL

logger = logging.getLogger("runner")

_secrets: set[str] = set()
# Credentials in any URL-ish text, and `password=` in a query string or conninfo.
# An encoded password may hold spaces and quotes; the first raw "@" ends it.
_URL_CREDENTIALS = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@]+?@", re.IGNORECASE)
_PASSWORD_PARAM = re.compile(r"(\bpassword\s*=\s*)('[^']*'|[^&\s'\"]+)", re.IGNORECASE)
MASK = "***"
_format = "text"


def add_secret(secret: str | None) -> None:
    """Mask this value, raw and percent-encoded, in all output from now on."""
    if secret:
        # SQLAlchemy percent-encodes fewer characters than urllib does.
        rendered = URL.create("x", username="u", password=secret).render_as_string(hide_password=False)
        sqlalchemy_form = rendered.removeprefix("x://u:").removesuffix("@")
        _secrets.update({secret, quote(secret, safe=""), quote_plus(secret), sqlalchemy_form} - {""})


def redact(text: str) -> str:
    """The text with every registered secret and URL credential masked."""
    for secret in sorted(_secrets, key=len, reverse=True):
        text = text.replace(secret, MASK)
    text = _URL_CREDENTIALS.sub(rf"\g<1>{MASK}@", text)
    return _PASSWORD_PARAM.sub(rf"\g<1>{MASK}", text)


class JsonFormatter(logging.Formatter):
    """One JSON object a record: time, level, logger, event, and any `extra` fields."""

    _standard = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": redact(record.getMessage()),
        }
        for key, value in vars(record).items():
            if key not in self._standard and not key.startswith("_"):
                entry[key] = _redact_values(value)
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        # Values only are masked: a short secret must not corrupt the keys.
        return json.dumps(entry, default=lambda value: redact(str(value)))


def _redact_values(value):
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _redact_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redact_values(v) for v in value]
    return value


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


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
                self._logger.log(self._level, line.rstrip())
        return len(text)

    def flush(self) -> None:
        self._original.flush()

    def fileno(self) -> int:
        return self._original.fileno()

    def isatty(self) -> bool:
        return self._original.isatty()


def _ignore_file_config(*args, **kwargs) -> None:
    logger.debug("alembic.ini logging section ignored: MIGRATE_LOG_LEVEL and MIGRATE_LOG_FORMAT apply")


def setup(fmt: str | None = None, level: str = "INFO") -> str:
    """Send all logging to stderr as text or JSON; returns the format chosen."""
    global _format
    stream = sys.__stderr__
    fmt = _format = fmt or ("text" if stream.isatty() else "json")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    for name in ("runner", "alembic", "stdout", "stderr"):
        logging.getLogger(name).setLevel(level)
        logging.getLogger(name).disabled = False
    logging.captureWarnings(True)
    logging.config.fileConfig = _ignore_file_config
    sys.stdout = _LineWriter("stdout", logging.INFO, sys.__stdout__)
    sys.stderr = _LineWriter("stderr", logging.WARNING, sys.__stderr__)
    return fmt


def summary(level: int, fields: dict) -> None:
    """A command's last line: its message with the fields, as one JSON object in JSON mode."""
    message = fields["message"]
    if _format == "json":
        logger.log(level, "%s", message, extra={k: v for k, v in fields.items() if k != "message"})
    else:
        logger.log(level, "%s %s", message, json.dumps({k: v for k, v in fields.items() if k != "message"}))

"""Logging: one line per event, JSON when standard error is not a terminal.

Context travels as ``extra={...}`` (scene, location, step, job ids) and appears
as keys of the JSON object, or as ``key=value`` after a text message. Code that
runs on behalf of something (a scheduled job) wraps itself in
:func:`log_context`, and every record it logs, in any module, carries those ids.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Literal

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


# The ids of what the current thread works for; a context variable, so that
# every job thread has its own.
_ids: contextvars.ContextVar[dict[str, object] | None] = contextvars.ContextVar(
    "revisit_log_ids", default=None
)


@contextmanager
def log_context(**ids: object) -> Iterator[None]:
    """Add ``ids`` (e.g. ``job="learn"``) to every record logged inside the block.

    Ids given in a record's own ``extra`` win over these.
    """
    token = _ids.set({**(_ids.get() or {}), **ids})
    try:
        yield
    finally:
        _ids.reset(token)


class ContextFilter(logging.Filter):
    """Puts the ids of :func:`log_context` on each record that does not carry them itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in (_ids.get() or {}).items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


def _context(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the record's context."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(_context(record))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """``HH:MM:SS level logger: message key=value ...`` for people at a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
        context = " ".join(f"{k}={v}" for k, v in _context(record).items())
        line = f"{when} {record.levelname.lower():7s} {record.name}: {record.getMessage()}"
        if context:
            line += f"  {context}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure_logging(
    *, level: str = "INFO", fmt: Literal["auto", "json", "text"] = "auto"
) -> None:
    """Send revisit's log to standard error, replacing any handler set before.

    Args:
        level: The threshold.
        fmt: ``json``, ``text``, or ``auto``: JSON unless standard error (where
            the log goes) is a terminal.
    """
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # SQLAlchemy and Alembic are chatty at INFO; revisit logs what matters itself.
    logging.getLogger("sqlalchemy").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(max(logging.WARNING, root.level))
    # APScheduler logs every run twice at INFO; the daemon logs each run once, with its id.
    logging.getLogger("apscheduler").setLevel(max(logging.WARNING, root.level))
    # The ONNX exporter's optimiser logs each of its passes at INFO.
    for chatty in ("onnxscript", "onnx_ir", "torch.onnx"):
        logging.getLogger(chatty).setLevel(max(logging.WARNING, root.level))
    # urllib3 logs each request's path and query at DEBUG: a webhook URL's token.
    logging.getLogger("urllib3").setLevel(max(logging.INFO, root.level))

"""Log lines for people (the default) or for a log pipeline (``BOTP_LOG_FORMAT=json``).

The inbound chain and delivery say which bot, channel and subscriber they are working
for (``log_context``); the JSON formatter adds those fields to every line logged meanwhile,
so one customer's story can be filtered out of a busy log. Secrets never reach a line:
``install_log_redaction`` cleans each record as it is created, before any formatter runs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
CONTEXT_FIELDS = ("bot", "channel", "subscriber_id")

# Never mutated in place: each change sets a new mapping (so a task's copy stays its own).
_context: ContextVar[Mapping[str, Any]] = ContextVar("botp_log_context",
                                                     default=MappingProxyType({}))


@contextmanager
def log_context(**values: Any) -> Iterator[None]:
    """Add fields (bot, channel, subscriber_id) to every line logged inside the block, in
    this task only (asyncio copies the context per task)."""
    token = _context.set({**_context.get(), **{k: v for k, v in values.items()
                                               if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


def set_log_field(name: str, value: Any) -> None:
    """Add one field to the current block's context (the subscriber id, once known)."""
    if value is not None:
        _context.set({**_context.get(), name: value})


def current_log_context() -> dict[str, Any]:
    return dict(_context.get())


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the context fields where
    known, and the traceback (already redacted by the record factory) as ``exc``."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        context = _context.get()  # handlers format in the logging call's own task
        line.update((k, context[k]) for k in CONTEXT_FIELDS if k in context)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def handler(log_format: str) -> logging.Handler:
    """A stderr handler in the chosen format ("text" or "json")."""
    stream = logging.StreamHandler()
    stream.setFormatter(JsonFormatter() if log_format == "json"
                        else logging.Formatter(TEXT_FORMAT))
    return stream


def uvicorn_log_config(log_format: str) -> dict[str, Any] | None:
    """uvicorn's own logging set-up, or None (its loggers then go through the root handler,
    so the access and error lines are JSON too)."""
    if log_format != "json":
        from uvicorn.config import LOGGING_CONFIG

        return LOGGING_CONFIG
    return None

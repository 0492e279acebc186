"""Bot secrets out of every text that leaves an adapter: send results stored in the outbox,
API responses and log lines. Error messages of HTTP clients carry the URL (Telegram's
``/bot<token>/``, Facebook's ``access_token=``), so adapters redact what they report and a
log record factory is the safety net for everything else.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import quote, quote_plus

from bot_platform.types import SendResult

REDACTED = "[redacted]"
MIN_SECRET_LENGTH = 6  # shorter values are not secrets worth mangling every text for
# Secrets in the shapes messenger URLs carry them, whoever's they are.
SECRET_SHAPES = (
    (re.compile(r"/bot\d+:[A-Za-z0-9_-]+"), f"/bot{REDACTED}"),  # Telegram Bot API paths
    (re.compile(r"\b(access_token|appsecret_proof|input_token|hub\.verify_token)="
                r"[^&\s'\"<>)]+"), rf"\1={REDACTED}"),  # Graph API query strings
)
_known_forms: tuple[str, ...] = ()  # every bot secret seen in this process, longest first
_log_redaction_installed = False


def _forms(secrets: Iterable[str | None]) -> set[str]:
    """A secret as it may appear in text: as is, and URL-encoded (in a query string)."""
    forms: set[str] = set()
    for secret in secrets:
        if secret and len(secret) >= MIN_SECRET_LENGTH:
            forms.update((secret, quote(secret, safe=""), quote_plus(secret)))
    return forms


def _redact(text: str, forms: Sequence[str]) -> str:
    for form in forms:
        if form in text:
            text = text.replace(form, REDACTED)
    for pattern, replacement in SECRET_SHAPES:
        text = pattern.sub(replacement, text)
    return text


def _longest_first(forms: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted(forms, key=len, reverse=True))


class Redactor:
    """Takes one bot's secrets out of text. Error messages of HTTP clients carry the URL
    (Telegram's ``/bot<token>/``, Facebook's ``access_token=``); they become send results,
    stored in the outbox and shown to staff, and log lines: neither may hold a secret.
    Adapters apply it where an error becomes a ``SendResult`` or a log line."""

    def __init__(self, *secrets: str | None) -> None:
        self.forms = _longest_first(_forms(secrets))
        remember_secrets(*secrets)

    def __call__(self, text: str) -> str:
        return _redact(text, self.forms)

    def result(self, result: SendResult) -> SendResult:
        """The same result with its reason redacted."""
        if not result.reason:
            return result
        reason = self(result.reason)
        return result if reason == result.reason else dataclasses.replace(result, reason=reason)

    def results(self, results: dict[str, SendResult]) -> dict[str, SendResult]:
        return {recipient: self.result(r) for recipient, r in results.items()}


def redact_secrets(text: str) -> str:
    """``text`` without any bot secret this process knows (the safety net behind the
    adapters' own redaction)."""
    return _redact(text, _known_forms)


def remember_secrets(*secrets: str | None) -> None:
    """Add secrets to the process-wide set that every log record is cleaned of."""
    global _known_forms
    forms = _forms(secrets)
    if not forms.issubset(_known_forms):
        _known_forms = _longest_first(forms.union(_known_forms))
    if forms:
        install_log_redaction()


def install_log_redaction() -> None:
    """Clean every log record of known secrets as it is created, whichever logger and
    handler it goes to (the messenger clients' tracebacks and uvicorn's access log with a
    ``hub.verify_token`` in its query included). Idempotent."""
    global _log_redaction_installed
    if _log_redaction_installed:
        return
    _log_redaction_installed = True
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        _redact_record(record)
        return record

    logging.setLogRecordFactory(factory)


def _redact_record(record: logging.LogRecord) -> None:
    try:
        message = record.getMessage()
    except Exception:  # a bad format string: the handler reports it as usual
        return
    clean = redact_secrets(message)
    if clean != message:
        record.msg, record.args = clean, None
    if record.exc_info and record.exc_info[1] is not None:
        text = logging.Formatter().formatException(record.exc_info)
        clean = redact_secrets(text)
        if clean != text:
            record.exc_text = clean  # formatters use it instead of formatting exc_info

"""Webhook input checks the adapters share: a JSON body of bounded size and depth, and
timestamps in range. Each failure is a ``BadPayload`` (400): the body is not something a
messenger sends, so re-delivering it cannot help, and a 500 would make it re-deliver.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from typing import Any

from bot_platform.errors import BadPayload

MAX_BODY_BYTES = 2 * 1024 * 1024  # a Facebook batch of many events is well below this
MAX_DEPTH = 64  # a Telegram Update with a replied-to message nests about 10 deep
_LATEST_MS = 32503680000000  # 3000-01-01: later is no messenger's clock


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def load_json(body: bytes) -> Any:
    """Parse a webhook body: JSON (no NaN/Infinity), at most ``MAX_BODY_BYTES`` and
    ``MAX_DEPTH`` levels of arrays and objects."""
    if len(body) > MAX_BODY_BYTES:
        raise BadPayload(f"body of {len(body)} bytes is over {MAX_BODY_BYTES}")
    try:
        data = json.loads(body, parse_constant=_no_constant)
    except RecursionError as error:  # the C scanner stops at the interpreter's limit
        raise BadPayload("body is nested too deeply") from error
    except ValueError as error:  # includes UnicodeDecodeError and over-long integers
        raise BadPayload(f"body is not JSON: {error}") from error
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        children = value.values() if isinstance(value, dict) else value \
            if isinstance(value, list) else None
        if children is None:
            continue
        if depth > MAX_DEPTH:
            raise BadPayload(f"body is nested more than {MAX_DEPTH} levels deep")
        stack.extend((child, depth + 1) for child in children
                     if isinstance(child, dict | list))
    return data


def epoch_ms(value: Any) -> datetime | None:
    """A messenger's milliseconds-since-epoch timestamp as a UTC datetime (None if absent).
    Anything but a number in range is a malformed body."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or \
            not math.isfinite(value) or not 0 <= value < _LATEST_MS:
        raise BadPayload(f"timestamp {str(value)[:40]!r} is not milliseconds since 1970")
    return datetime.fromtimestamp(value / 1000, UTC)


def expect_dict(value: Any, what: str, *, optional: bool = True) -> dict[str, Any]:
    """``value`` if it is an object; ``{}`` if absent (null) and ``optional``; otherwise a
    malformed body."""
    if value is None and optional:
        return {}
    if not isinstance(value, dict):
        raise BadPayload(f"{what} is {type(value).__name__}, not an object")
    return value


def expect_str(value: Any, what: str) -> str | None:
    """``value`` if it is a string, None if absent; a number or object is malformed."""
    if value is None or isinstance(value, str):
        return value
    raise BadPayload(f"{what} is {type(value).__name__}, not a string")

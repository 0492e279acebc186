"""Values the databases can store, checked where data enters (the edge).

Both databases must take whatever the edge lets through, the same way: PostgreSQL rejects
NUL characters in text and numbers outside a 64-bit integer, neither stores an unpaired
UTF-16 surrogate (``"\\ud800"``, which JSON can carry), and every column has a length. The
API rejects such values with 422 (``StorableText``, ``DbInt``, ``StorableJson``); text from
messengers and shop events is made storable instead (``storable``), since a messenger
re-sends a refused update forever.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

from annotated_types import Ge, Le, MaxLen, MinLen
from pydantic import AfterValidator

INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)
INT32_MAX = 2**31 - 1  # an Integer column on PostgreSQL
JSON_MAX_DEPTH = 16  # nesting of a JSON value (attributes, event data)
_SURROGATE = re.compile("[\ud800-\udfff]")  # (a str holds a valid pair as one character)

# An integer a BIGINT column (or SQLite's INTEGER) holds; ids are positive.
DbInt = Annotated[int, Ge(INT64_MIN), Le(INT64_MAX)]
DbId = Annotated[int, Ge(1), Le(INT64_MAX)]


def unstorable(value: str) -> str | None:
    """Why ``value`` cannot be stored as text, or None when it can."""
    if "\x00" in value:
        return "text must not contain NUL characters"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "text must not contain unpaired surrogates"
    return None


def _check_text(value: str) -> str:
    problem = unstorable(value)
    if problem:
        raise ValueError(problem)
    return value


StorableText = Annotated[str, AfterValidator(_check_text)]


def text(max_length: int, min_length: int = 0) -> Any:
    """Storable text that fits a ``String(max_length)`` column (a type for models and
    parameters)."""
    return Annotated[str, MinLen(min_length), MaxLen(max_length), AfterValidator(_check_text)]


def storable(value: str, max_length: int | None = None) -> str:
    """``value`` made storable: NUL removed, unpaired surrogates replaced (U+FFFD), cut to
    ``max_length`` characters."""
    if unstorable(value):
        value = _SURROGATE.sub("\ufffd", value.replace("\x00", ""))
    return value[:max_length] if max_length is not None else value


def storable_or_none(value: str | None, max_length: int | None = None) -> str | None:
    return None if value is None else storable(value, max_length)


def json_problem(value: Any, depth: int = 0) -> str | None:
    """Why a JSON value cannot be stored and read back alike on both databases."""
    if depth > JSON_MAX_DEPTH:
        return f"nested deeper than {JSON_MAX_DEPTH} levels"
    if isinstance(value, str):
        return unstorable(value)
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return None if INT64_MIN <= value <= INT64_MAX else "integer out of the 64-bit range"
    if isinstance(value, float):
        return None if math.isfinite(value) else "number out of range"
    if isinstance(value, list | tuple):
        for item in value:
            problem = json_problem(item, depth + 1)
            if problem:
                return problem
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            problem = json_problem(str(key), depth) or json_problem(item, depth + 1)
            if problem:
                return problem
        return None
    return f"not a JSON value: {type(value).__name__}"


def _check_json(value: Any) -> Any:
    problem = json_problem(value)
    if problem:
        raise ValueError(problem)
    return value


StorableJson = Annotated[dict[str, Any], AfterValidator(_check_json)]


def storable_json(value: Any, depth: int = 0) -> Any:
    """A JSON value made storable (from messengers and shop events): text as ``storable``,
    out-of-range numbers as text, nesting past the limit dropped."""
    if isinstance(value, str):
        return storable(value)
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return value if INT64_MIN <= value <= INT64_MAX else str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if depth >= JSON_MAX_DEPTH:
        return None
    if isinstance(value, list | tuple):
        return [storable_json(item, depth + 1) for item in value]
    if isinstance(value, dict):
        return {storable(str(k)): storable_json(v, depth + 1) for k, v in value.items()}
    return storable(str(value))

"""Values the databases can store, checked where data enters (the edge).

Both databases must take whatever the edge lets through, the same way: PostgreSQL rejects
NUL characters in text and numbers outside a 64-bit integer, neither stores an unpaired
UTF-16 surrogate (``"\\ud800"``, which JSON can carry), and every column has a length. The
API rejects such values with 422 (``StorableText``, ``DbInt``, ``StorableJson``); text from
messengers and shop events is made storable instead (``storable``), since a messenger
re-sends a refused update forever.

Bidi and lengths: a first name such as ``"\\u202eevil"`` (RIGHT-TO-LEFT OVERRIDE) inserted
into "Hi {name}! Welcome..." would render the rest of the message backwards; inside
FSI ... PDI (``isolate``) it can only affect itself. ``utf16_len``: Telegram's 4096/1024
limits count UTF-16 code units (an emoji is 2).
"""

from __future__ import annotations

import math
import unicodedata
from typing import Annotated, Any

from annotated_types import Ge, Le, MaxLen, MinLen
from pydantic import AfterValidator

INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)
INT32_MAX = 2**31 - 1  # an Integer column on PostgreSQL
JSON_MAX_DEPTH = 16  # nesting of a JSON value (attributes, event data)

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
    """``value`` made storable: NUL removed, unpaired surrogates replaced (U+FFFD; a proper
    pair written as two escapes becomes its character), cut to ``max_length`` characters."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        value = value.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    if "\x00" in value:
        value = value.replace("\x00", "")
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


def storable_json(value: Any, depth: int = 0, max_length: int | None = None) -> Any:
    """A JSON value made storable (from messengers and shop events): text as ``storable``
    (each string, keys too, cut to ``max_length``), out-of-range numbers as text, nesting
    past the limit dropped."""
    if isinstance(value, str):
        return storable(value, max_length)
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return value if INT64_MIN <= value <= INT64_MAX else str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if depth >= JSON_MAX_DEPTH:
        return None
    if isinstance(value, list | tuple):
        return [storable_json(item, depth + 1, max_length) for item in value]
    if isinstance(value, dict):
        return {storable(str(k), max_length): storable_json(v, depth + 1, max_length)
                for k, v in value.items()}
    return storable(str(value), max_length)


FSI = "\u2068"  # FIRST STRONG ISOLATE
PDI = "\u2069"  # POP DIRECTIONAL ISOLATE
RLM = "\u200f"  # RIGHT-TO-LEFT MARK
_ISOLATE_OPENERS = frozenset("\u2066\u2067\u2068")  # LRI, RLI, FSI
# Bidi class B: each ends a paragraph, and with it every isolate opened before it.
_PARAGRAPH_BREAKS = frozenset("\n\r\x1c\x1d\x1e\x85\u2029")
RTL_LANGUAGES = frozenset({"ar", "arc", "ckb", "dv", "fa", "he", "ks", "ps", "sd", "ug",
                           "ur", "yi"})


def utf16_len(text: str) -> int:
    """Length in UTF-16 code units: characters outside the Basic Multilingual Plane
    (most emoji) count twice."""
    return len(text) + sum(1 for char in text if ord(char) > 0xFFFF)


# Right-to-left letters, Arabic digits, and the explicit embeddings, overrides and isolates.
_DIRECTIONAL = frozenset({"R", "AL", "AN", "LRE", "RLE", "LRO", "RLO", "PDF", "LRI", "RLI",
                          "FSI", "PDI"})


def needs_isolation(value: str) -> bool:
    """Whether ``value`` can change the direction of the text around it: it has
    right-to-left letters or bidi controls. Left-to-right text (Latin, Cyrillic, digits,
    emoji) cannot, and stays bare: promo codes and links get no invisible characters, and
    a right-to-left message that starts with it gets a mark instead (``rtl_start``)."""
    return not value.isascii() and any(
        unicodedata.bidirectional(char) in _DIRECTIONAL for char in value)


def isolate(value: str) -> str:
    """``value`` between FSI and PDI, with nothing inside able to end the isolate early:
    a PDI without its opener is dropped, openers without a PDI are closed, and paragraph
    breaks (which end every isolate) become spaces. Embeddings and overrides inside
    (RLO, LRE, ...) are ended by the closing PDI."""
    out = [FSI]
    depth = 0
    for char in value:
        if char in _PARAGRAPH_BREAKS:
            char = " "
        elif char in _ISOLATE_OPENERS:
            depth += 1
        elif char == PDI:
            if depth == 0:
                continue
            depth -= 1
        out.append(char)
    out.append(PDI * depth)
    out.append(PDI)
    return "".join(out)


def first_strong(text: str) -> str | None:
    """The bidi class (``"L"``, ``"R"`` or ``"AL"``) of the first strong character, looking
    inside isolates too (clients that ignore them decide the direction from it)."""
    for char in text:
        kind = unicodedata.bidirectional(char)
        if kind in ("L", "R", "AL"):
            return kind
    return None


def is_rtl_locale(locale: str) -> bool:
    return locale.replace("_", "-").split("-")[0].lower() in RTL_LANGUAGES


def rtl_start(text: str) -> str:
    """A right-to-left message whose first strong character is left-to-right (a Latin
    name at its start) gets a RIGHT-TO-LEFT MARK first, so Telegram and Viber, which take
    the direction from the first strong character, lay it out right to left."""
    if text and not text.startswith(RLM) and first_strong(text) == "L":
        return RLM + text
    return text

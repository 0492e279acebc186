"""The building blocks of a flow file's models: the base model, names, durations, RE2
patterns and the "did you mean" hint every error message uses."""

from __future__ import annotations

import difflib
import functools
import re
from datetime import timedelta
from typing import Any

import re2
from pydantic import BaseModel, ConfigDict

NAME_PATTERN = r"^[a-z][a-z0-9_-]{0,47}$"
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(w|d|h|m|s)")
_UNITS = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}


class Spec(BaseModel):
    """Every part of a flow file: unknown keys are errors, parsed specs are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


_DURATIONS: dict[tuple[type, Any], timedelta] = {}  # parsed durations, by type and value


def parse_duration(value: Any) -> timedelta:
    """``"1d"``, ``"1h30m"``, ``"45s"``, ``"2w"`` or a number of seconds -> timedelta
    (remembered: a state's ``after`` is parsed each time a subscriber enters it)."""
    key = (type(value), value)
    try:
        return _DURATIONS[key]
    except (KeyError, TypeError):
        pass
    found = _parse_duration(value)
    if len(_DURATIONS) < 4096:
        try:
            _DURATIONS[key] = found
        except TypeError:  # not hashable
            pass
    return found


def _parse_duration(value: Any) -> timedelta:
    if isinstance(value, bool):
        raise ValueError(f"bad duration {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = str(value).strip().lower().replace(" ", "")
        if not text or _DURATION_PART.sub("", text):
            raise ValueError(
                f"bad duration {value!r}: use numbers with w, d, h, m or s (e.g. 30m, 1d, 1h30m)"
            )
        seconds = sum(float(n) * _UNITS[unit] for n, unit in _DURATION_PART.findall(text))
    if seconds <= 0:
        raise ValueError(f"bad duration {value!r}: must be positive")
    return timedelta(seconds=seconds)


def lenient_number(value: Any) -> float | None:
    """A number from text as people type it (``"2,5"``, ``" 3 "``, ``"1e3"``), for
    scores and number captures; conditions use the stricter ``conditions.as_number``."""
    try:
        return float(str(value).replace(",", "."))
    except (TypeError, ValueError):
        return None


# Capture patterns run on customer text, so they are compiled with RE2, which matches in
# time linear in the input (no backtracking: ``(a+)+$`` cannot hang the event loop); the
# price is no backreferences or lookaround, and ``\w``, ``\d``, ``\b`` are ASCII (use
# ``\pL``, ``\pN`` for letters and digits of every script).
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # a bad pattern is reported as a flow issue, not on stderr


@functools.lru_cache(maxsize=256)
def compile_pattern(pattern: str) -> Any:
    """A capture pattern compiled with RE2; raises ValueError with RE2's reason."""
    try:
        return re2.compile(pattern, _RE2_OPTIONS)
    except re2.error as error:
        reason = error.args[0] if error.args else error
        if isinstance(reason, bytes):
            reason = reason.decode(errors="replace")
        raise ValueError(f"bad pattern {pattern!r}: {reason} (patterns use RE2 syntax: "
                         "no backreferences or lookaround)") from error


def did_you_mean(value: Any, choices: Any, synonyms: dict[str, str] | None = None,
                 cutoff: float = 0.6) -> str:
    """`` (did you mean 'gt'?)`` when something close (or a known synonym) exists."""
    word = str(value).strip().lower()
    hint = (synonyms or {}).get(word) or next(
        iter(difflib.get_close_matches(word, list(choices), n=1, cutoff=cutoff)), None)
    return f" (did you mean {hint!r}?)" if hint else ""

"""Free text a user types into a ``capture`` state, checked against its spec."""

from __future__ import annotations

import re
from typing import Any

from bot_platform.flows.base import compile_pattern, lenient_number
from bot_platform.flows.spec import CaptureSpec

_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_PHONE = re.compile(r"^\+?\d{7,15}$")
# Customer text longer than this never validates against a pattern (an email, a phone, a
# number, a flow's regex, a choice): a bound on the work one message can cause, far above
# any value such a capture expects. Free ``text`` captures keep what they get.
MAX_MATCHED_CHARS = 1000


def validate_capture(spec: CaptureSpec, text: str) -> tuple[bool, Any]:
    """Check free text against a capture spec; returns (ok, normalized value)."""
    text = text.strip()
    if not text:
        return False, None
    if spec.type != "text" and len(text) > MAX_MATCHED_CHARS:
        return False, None
    if spec.type == "email":
        return (True, text.lower()) if _EMAIL.match(text) else (False, None)
    if spec.type == "phone":
        digits = re.sub(r"[\s\-().]", "", text)
        return (True, digits) if _PHONE.match(digits) else (False, None)
    if spec.type == "number":
        number = lenient_number(text)
        if number is None or (spec.min is not None and number < spec.min) or (
            spec.max is not None and number > spec.max
        ):
            return False, None
        return True, int(number) if number.is_integer() else number
    if spec.type == "regex":
        # RE2: linear time, whatever the pattern (validated at load with the same engine).
        matched = compile_pattern(spec.pattern or "").fullmatch(text)
        return (True, text) if matched else (False, None)
    if spec.type == "choice":
        for choice in spec.choices:
            if choice.casefold() == text.casefold():
                return True, choice
        return False, None
    return True, text

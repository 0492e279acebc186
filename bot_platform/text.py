"""Text at the edges: values a database can store, values that cannot turn the text around
them backwards, and lengths counted the way a messenger counts them.

- ``storable_text``: messengers (and JSON's ``\\ud800`` escapes) can hand us NUL characters
  (PostgreSQL text refuses them) and lone UTF-16 surrogates (no driver can encode them).
  The adapters pass every string of an ``Inbound`` through it.
- ``isolate`` / ``rtl_start``: a first name such as ``"\\u202eevil"`` (RIGHT-TO-LEFT
  OVERRIDE) inserted into "Hi {name}! Welcome..." would render the rest of the message
  backwards; inside FSI ... PDI (Unicode's first-strong isolate) it can only affect itself.
- ``utf16_len``: Telegram's 4096/1024 limits count UTF-16 code units (an emoji is 2).
"""

from __future__ import annotations

import unicodedata

FSI = "\u2068"  # FIRST STRONG ISOLATE
PDI = "\u2069"  # POP DIRECTIONAL ISOLATE
RLM = "\u200f"  # RIGHT-TO-LEFT MARK
_ISOLATE_OPENERS = frozenset("\u2066\u2067\u2068")  # LRI, RLI, FSI
# Bidi class B: each ends a paragraph, and with it every isolate opened before it.
_PARAGRAPH_BREAKS = frozenset("\n\r\x1c\x1d\x1e\x85\u2029")
RTL_LANGUAGES = frozenset({"ar", "arc", "ckb", "dv", "fa", "he", "ks", "ps", "sd", "ug",
                           "ur", "yi"})


def storable_text(value: str, max_len: int | None = None) -> str:
    """``value`` without NUL characters, lone surrogates replaced by U+FFFD, and cut to
    ``max_len`` characters (code points, never half a surrogate pair)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # surrogates: a proper pair becomes its character
        value = value.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    if "\x00" in value:
        value = value.replace("\x00", "")
    if max_len is not None and len(value) > max_len:
        value = value[:max_len]
    return value


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

"""Fitting a message to a channel: the parts it sends, one API call each.

Why its own module: every channel's limits (text length in characters or UTF-16 units,
captions, buttons, carousels) are applied here once, from ``Capabilities``, so adapters
only render a part that already fits and flows never ask which messenger they run on.
Each part becomes its own outbox row, so a retry re-sends only the part that failed.
"""

from __future__ import annotations

import unicodedata
import weakref
from typing import Any

from bot_platform.text import utf16_len
from bot_platform.types import Button, Capabilities, Outgoing

_NO_CUT_BEFORE = frozenset("\u200d\ufe0e\ufe0f")  # ZWJ, text/emoji variation selectors


def _hard_cut(text: str, end: int) -> int:
    """Move a cut at ``end`` back so it does not separate a character from the combining
    mark, joiner or variation selector after it (an emoji sequence stays whole when it
    can); a cut at the start is not moved."""
    cut = end
    while cut > 1 and (text[cut] in _NO_CUT_BEFORE or text[cut - 1] == "\u200d"
                       or unicodedata.combining(text[cut])
                       or 0x1F3FB <= ord(text[cut]) <= 0x1F3FF):  # skin tones
        cut -= 1
    return cut if cut > end - 16 else end


def split_text(text: str, limit: int, *, utf16: bool = False) -> list[str]:
    """Split ``text`` into chunks of at most ``limit`` characters, or UTF-16 code units
    with ``utf16`` (Telegram counts them: an emoji is 2), on word boundaries where there
    are any. A chunk never ends inside a character (a surrogate pair)."""
    measure = utf16_len if utf16 else len
    if measure(text) <= limit:
        return [text]
    chunks: list[str] = []
    rest = text
    while measure(rest) > limit:
        end = limit if not utf16 else _fits_utf16(rest, limit)
        cut = max(rest.rfind("\n", 0, end + 1), rest.rfind(" ", 0, end + 1))
        if cut <= 0:
            cut = _hard_cut(rest, end)  # one very long word: cut it hard
        chunk = rest[:cut].rstrip()
        if not chunk:  # only spaces before the cut: cut the word itself
            cut = _hard_cut(rest, end)
            chunk = rest[:cut]
        chunks.append(chunk)
        rest = rest[cut:].lstrip()
    if rest:
        chunks.append(rest)
    return chunks


def _fits_utf16(text: str, limit: int) -> int:
    """The largest ``n`` with ``utf16_len(text[:n]) <= limit`` (at least 1)."""
    units = 0
    for index, char in enumerate(text):
        units += 2 if ord(char) > 0xFFFF else 1
        if units > limit:
            return max(index, 1)
    return len(text)


def truncate_utf16(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` UTF-16 code units, between characters."""
    return text if utf16_len(text) <= limit else text[:_fits_utf16(text, limit)]


def _truncate(title: str, limit: int) -> str:
    return title if len(title) <= limit else title[: max(limit - 1, 0)] + "…"


CONTINUATION_TEXT = "…"


class NotOneCall(ValueError):
    """A message an adapter cannot send in one API call: it was not fitted
    (``fit_message``). Refused rather than sent in pieces, which a retry would repeat."""


def _text_len(text: str, caps: Capabilities) -> int:
    return utf16_len(text) if caps.text_units == "utf16" else len(text)


# (id of the message, id of the capabilities) -> (both, the parts): a message rendered
# once for many subscribers (``CompiledFlow.render``, ``share``) is fitted once per
# channel. Both objects are kept, so an id is never reused while its entry lives. Only
# shared messages go in: one subscriber's own texts are not kept in memory.
_FITTED: dict[tuple[int, int], tuple[Outgoing, Capabilities, tuple[Outgoing, ...]]] = {}
_FITTED_MAX = 512
_SHARED: dict[int, weakref.ref[Outgoing]] = {}  # id -> the shared message, while it lives


def share(message: Outgoing) -> None:
    """Mark ``message`` as sent to many subscribers as it is: ``fit_message`` keeps its
    parts. The mark goes when the message does."""
    key = id(message)
    _SHARED[key] = weakref.ref(message, lambda _, key=key: _SHARED.pop(key, None))


def fit_message(message: Outgoing, caps: Capabilities) -> list[Outgoing]:
    """Fit one message to a channel's capabilities: the parts it sends, one API call each
    (see ``_fit``). A shared message (``share``) for the same channel is fitted once."""
    shared = _SHARED.get(id(message))
    if shared is None or shared() is not message:
        return _fit(message, caps)
    key = (id(message), id(caps))
    found = _FITTED.get(key)
    if found is not None and found[0] is message and found[1] is caps:
        return list(found[2])
    parts = _fit(message, caps)
    if len(_FITTED) >= _FITTED_MAX:
        _FITTED.clear()
    _FITTED[key] = (message, caps, tuple(parts))
    return parts


def _fit(message: Outgoing, caps: Capabilities) -> list[Outgoing]:
    """Fit one message to a channel's capabilities: the parts it sends, one API call each.

    Each part becomes its own outbox row, so a retry re-sends only the part that failed.
    Pure and deterministic: a picture whose text cannot be its caption goes first on its
    own; long text is split on word boundaries (buttons stay on the last part, whose text
    the channel may limit further); surplus buttons move to follow-up messages, URL buttons
    become links in the text where the channel has none, carousels become a sequence of
    image cards where the channel has no carousel, and surplus quick replies are dropped
    from the end.
    """
    buttons = [b.model_copy(update={"title": _truncate(b.title, caps.max_button_title)})
               for b in message.buttons]
    text = message.text
    if not caps.url_buttons:
        links = [b for b in buttons if b.url]
        buttons = [b for b in buttons if not b.url]
        if links:
            text = "\n".join([text, *[f"{b.title}: {b.url}" for b in links]]).strip()
    quick = list(message.quick_replies)[: caps.max_quick_replies] if caps.quick_replies else []
    if not caps.quick_replies and message.quick_replies:
        buttons.extend(Button(title=q.title, payload=q.payload) for q in message.quick_replies
                       if q.request is None and q.payload)

    common: dict[str, Any] = {"outside_window": message.outside_window,
                              "in_reply": message.in_reply, "by_agent": message.by_agent,
                              "extras": message.extras}
    parts: list[Outgoing] = []
    utf16 = caps.text_units == "utf16"
    texts = split_text(text, caps.max_text_length, utf16=utf16) if text else [""]
    if buttons and caps.max_button_text is not None and \
            _text_len(texts[-1], caps) > caps.max_button_text:
        texts[-1:] = split_text(texts[-1], caps.max_button_text, utf16=utf16)
    image = message.image_url if caps.images else None
    if image and caps.max_caption is not None and not (
            len(texts) == 1 and _text_len(texts[0], caps) <= caps.max_caption
            and (caps.caption_buttons or not buttons)):
        parts.append(Outgoing(image_url=image, **common))  # the picture on its own
        image = None
    button_groups = [buttons[i: i + caps.max_buttons]
                     for i in range(0, len(buttons), max(caps.max_buttons, 1))] or [[]]
    for chunk in texts[:-1]:
        parts.append(Outgoing(text=chunk, **common))
    last_text = texts[-1]
    for index, group in enumerate(button_groups):
        parts.append(Outgoing(
            text=last_text if index == 0 else CONTINUATION_TEXT,
            buttons=tuple(group),
            image_url=image if index == 0 else None,
            **common,
        ))
    if message.image_url and not caps.images:
        parts[0] = parts[0].model_copy(
            update={"text": f"{parts[0].text}\n{message.image_url}".strip()})

    if message.cards:
        cards = [c.model_copy(update={"buttons": c.buttons[: caps.max_card_buttons]})
                 for c in message.cards]
        if caps.carousels:
            for i in range(0, len(cards), caps.max_cards):
                parts.append(Outgoing(cards=tuple(cards[i: i + caps.max_cards]), **common))
        else:
            for card in cards:
                caption = "\n".join(x for x in (card.title, card.subtitle) if x)
                card_buttons = list(card.buttons)
                if card.url and not card_buttons:
                    card_buttons = [Button(title=card.title, url=card.url)]
                parts.extend(fit_message(Outgoing(
                    text=caption, image_url=card.image_url, buttons=tuple(card_buttons),
                    **common), caps))
    # An empty leading text part (a message that was only cards) carries nothing.
    parts = [p for p in parts if p.text or p.buttons or p.image_url or p.cards] or parts[:1]
    if quick:
        parts[-1] = parts[-1].model_copy(update={"quick_replies": tuple(quick)})
    return parts

"""The normalized vocabulary every channel speaks: inbound events, outgoing messages,
send results and channel capabilities.

Adapters in ``bots/`` turn a messenger's webhook bodies into ``Inbound`` events and render
``Outgoing`` messages into the messenger's API calls. The engine sees nothing else.
"""

from __future__ import annotations

import enum
import unicodedata
import weakref
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator

from bot_platform.text import storable, storable_json, utf16_len

# Bounds of what an inbound event may carry (the columns they end up in, or generous
# multiples of the messengers' own limits): longer text is cut, longer ids are refused.
# The validators below are the one place an event is made storable: a messenger re-sends
# an update we fail on forever, so what it sends is made storable rather than refused.
MAX_CHANNEL = 32
MAX_BOT_ID = 64
MAX_USER_ID = 128
MAX_EVENT_ID = 255
MAX_INBOUND_TEXT = 16384
MAX_PAYLOAD = 4096
MAX_PROFILE_VALUE = 255
MAX_DATA_STRING = 4096


class InboundKind(enum.StrEnum):
    """What happened at the messenger, as a past-tense fact."""

    TEXT = "text"  # the user typed text
    BUTTON = "button"  # the user pressed a button carrying ``payload``
    START = "start"  # the user started the bot / opened the chat (``ref`` = deep-link payload)
    SUBSCRIBED = "subscribed"  # the user (re)subscribed without a start (Viber, unblock)
    UNSUBSCRIBED = "unsubscribed"  # the user blocked the bot or unsubscribed
    CONTACT = "contact"  # the user shared a phone number (``profile.phone``)
    MEDIA = "media"  # a photo, file, sticker, location... (``data`` describes it)
    DELIVERED = "delivered"  # a message we sent reached the device (``message_ids``)
    READ = "read"  # the user read messages we sent (``message_ids`` or ``watermark``)
    FAILED = "failed"  # the messenger reports a message we sent as failed
    REFERRAL = "referral"  # an existing user followed a deep link (``ref``)


class Profile(BaseModel):
    """What the messenger tells us about the user; every field is optional."""

    model_config = ConfigDict(frozen=True)

    first_name: str | None = None
    last_name: str | None = None
    username: str | None = None
    language: str | None = None  # BCP-47-ish code as the messenger gives it ("en", "uk-UA")
    phone: str | None = None

    @field_validator("first_name", "last_name", "username")
    @classmethod
    def _storable_name(cls, value: str | None) -> str | None:
        return None if value is None else storable(value, MAX_PROFILE_VALUE)

    @field_validator("language")
    @classmethod
    def _storable_language(cls, value: str | None) -> str | None:
        return None if value is None else storable(value, 35)

    @field_validator("phone")
    @classmethod
    def _storable_phone(cls, value: str | None) -> str | None:
        return None if value is None else storable(value, 32)


class Inbound(BaseModel):
    """One normalized event from a messenger, for one user of one bot."""

    model_config = ConfigDict(frozen=True)

    channel: str
    bot_id: str
    user_id: str  # the messenger's id for the user (chat id on Telegram)
    event_id: str  # unique per (channel, bot): used to process re-deliveries once
    kind: InboundKind
    text: str | None = None
    payload: str | None = None  # button payload
    ref: str | None = None  # deep-link / m.me ref
    profile: Profile = Field(default_factory=Profile)
    occurred_at: datetime | None = None
    message_ids: tuple[str, ...] = ()  # for delivered / read / failed
    watermark: datetime | None = None  # "everything up to here was read" (Facebook)
    data: dict[str, Any] = Field(default_factory=dict)  # channel extras (media urls, ...)

    @field_validator("channel", "bot_id")
    @classmethod
    def _storable_bot(cls, value: str, info: Any) -> str:
        return storable(value, MAX_CHANNEL if info.field_name == "channel" else MAX_BOT_ID)

    @field_validator("user_id", "event_id")
    @classmethod
    def _bounded_id(cls, value: str, info: Any) -> str:
        limit = MAX_USER_ID if info.field_name == "user_id" else MAX_EVENT_ID
        value = storable(value)
        if not value or len(value) > limit:
            raise ValueError(f"must be 1 to {limit} characters")
        return value

    @field_validator("text")
    @classmethod
    def _storable_body(cls, value: str | None) -> str | None:
        return None if value is None else storable(value, MAX_INBOUND_TEXT)

    @field_validator("payload")
    @classmethod
    def _storable_payload(cls, value: str | None) -> str | None:
        return None if value is None else storable(value, MAX_PAYLOAD)

    @field_validator("ref")
    @classmethod
    def _storable_ref(cls, value: str | None) -> str | None:
        return None if value is None else storable(value, MAX_PROFILE_VALUE)

    @field_validator("message_ids")
    @classmethod
    def _storable_ids(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(storable(v, MAX_EVENT_ID) for v in value)

    @field_validator("data")
    @classmethod
    def _storable_data(cls, value: dict[str, Any]) -> dict[str, Any]:
        """Strings (keys too) cut, numbers the databases cannot hold as text, nesting past
        the limit dropped."""
        return storable_json(value, max_length=MAX_DATA_STRING)

    @property
    def is_status(self) -> bool:
        """Delivery/read/failed receipts carry no user intent and never touch flows."""
        return self.kind in (InboundKind.DELIVERED, InboundKind.READ, InboundKind.FAILED)


class Button(BaseModel):
    """An inline button: either a ``payload`` sent back to us when pressed, or a ``url``."""

    model_config = ConfigDict(frozen=True)

    title: str
    payload: str | None = None
    url: str | None = None


class QuickReply(BaseModel):
    """A suggested reply shown above the keyboard; ``request`` asks for the phone number."""

    model_config = ConfigDict(frozen=True)

    title: str
    payload: str = ""
    request: Literal["phone"] | None = None


class Card(BaseModel):
    """One card of a carousel (a product, typically)."""

    model_config = ConfigDict(frozen=True)

    title: str
    subtitle: str | None = None
    image_url: str | None = None
    url: str | None = None
    buttons: tuple[Button, ...] = ()


class Outgoing(BaseModel):
    """One message to send, already localized. Adapters render the closest native form."""

    model_config = ConfigDict(frozen=True)

    text: str = ""
    buttons: tuple[Button, ...] = ()
    quick_replies: tuple[QuickReply, ...] = ()
    image_url: str | None = None
    cards: tuple[Card, ...] = ()
    # What lets the message out after the channel's reply window closed: a message tag
    # (Facebook's POST_PURCHASE_UPDATE), or a template name for channels that need one.
    # Read as ``tag`` too: rows queued before it had this name.
    outside_window: str | None = Field(
        default=None, validation_alias=AliasChoices("outside_window", "tag"))
    # A direct answer to the customer's message, queued in the turn that handled it.
    # False for everything else (broadcasts, timers, shop events, fallbacks):
    # Facebook sends those as UPDATE, never RESPONSE.
    in_reply: bool = False
    # Written by a person (a support agent): inside the reply window it answers the
    # customer; past it, it goes with the channel's ``agent_window_pass`` if there is one.
    by_agent: bool = False
    extras: dict[str, Any] = Field(default_factory=dict)  # channel-specific additions


class SendStatus(enum.StrEnum):
    SENT = "sent"
    RETRY_AFTER = "retry_after"
    BLOCKED = "blocked"
    OUTSIDE_WINDOW = "outside_window"
    FAILED = "failed"
    TRANSIENT = "transient"


@dataclass(frozen=True, slots=True)
class SendResult:
    """What happened to one send. Build with the class methods, not the constructor."""

    status: SendStatus
    message_id: str | None = None
    retry_after: float | None = None
    reason: str | None = None

    @classmethod
    def sent(cls, message_id: str | None) -> SendResult:
        return cls(SendStatus.SENT, message_id=message_id)

    @classmethod
    def retry(cls, after: float, reason: str = "rate limited") -> SendResult:
        return cls(SendStatus.RETRY_AFTER, retry_after=after, reason=reason)

    @classmethod
    def blocked(cls, reason: str = "blocked by user") -> SendResult:
        return cls(SendStatus.BLOCKED, reason=reason)

    @classmethod
    def outside_window(cls, reason: str = "outside the messaging window") -> SendResult:
        return cls(SendStatus.OUTSIDE_WINDOW, reason=reason)

    @classmethod
    def failed(cls, reason: str) -> SendResult:
        return cls(SendStatus.FAILED, reason=reason)

    @classmethod
    def transient(cls, reason: str) -> SendResult:
        return cls(SendStatus.TRANSIENT, reason=reason)


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a messenger can show and how fast we may send. Safe defaults; adapters override.

    ``fit_message`` uses these so flows never ask which messenger they run on.
    """

    max_text_length: int = 4096
    text_units: Literal["chars", "utf16"] = "chars"  # what max_text_length counts
    max_buttons: int = 8  # inline buttons on one message
    max_button_title: int = 64
    # The longest button payload the messenger carries back (bytes); a longer one is kept
    # server-side under a short token (``channels.LongPayloads``). None: unlimited.
    callback_payload_bytes: int | None = None
    url_buttons: bool = True
    quick_replies: bool = True
    max_quick_replies: int = 10
    carousels: bool = False  # native carousel; otherwise a sequence of image cards
    max_cards: int = 10
    max_card_buttons: int = 3
    images: bool = True
    # A picture and text in one call: the longest text that rides as its caption (None:
    # any text that fits one message), and whether a captioned picture carries buttons.
    # A longer text, or buttons on a picture that cannot carry them, make the picture a
    # part of its own (one part = one API call: see ``fit_message``).
    max_caption: int | None = None
    caption_buttons: bool = True
    max_button_text: int | None = None  # the text of a message with buttons (Facebook: 640)
    batch_size: int = 1  # recipients per call for send_many
    messages_per_second: float = 30.0  # per bot
    per_chat_per_second: float = 1.0
    per_chat_burst: int = 3
    reply_window: timedelta | None = None  # Facebook: 24 h since the user's last message
    # What an agent's message carries past ``reply_window`` (Facebook: the HUMAN_AGENT tag,
    # good for 7 days); None: agents' messages obey the window like any other.
    agent_window_pass: str | None = None


def past_window(message: Outgoing, caps: Capabilities) -> Outgoing | None:
    """The message as it may go out after the channel's reply window closed: with its own
    pass (a tag, a template), an agent's with the channel's pass for agents; None when it
    may not go at all (the delivery worker skips it as ``outside_window``)."""
    if message.outside_window is not None:
        return message
    if message.by_agent and caps.agent_window_pass is not None:
        return message.model_copy(update={"outside_window": caps.agent_window_pass})
    return None


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

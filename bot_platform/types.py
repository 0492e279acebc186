"""The normalized vocabulary every channel speaks: inbound events, outgoing messages,
send results and channel capabilities.

Adapters in ``bots/`` turn a messenger's webhook bodies into ``Inbound`` events and render
``Outgoing`` messages into the messenger's API calls. The engine sees nothing else.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator

from bot_platform.text import storable, storable_json

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

"""The seam between the engine and a messenger: the ``Channel`` protocol and its registry.

A new messenger is one module in ``bots/`` exposing ``build(bot, deps) -> Channel`` plus one
line in ``BUILTIN_CHANNELS``. The core never imports a messenger SDK: adapters are loaded
by import string when a bot of that channel is configured.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from bot_platform.errors import ConfigError
from bot_platform.redaction import remember_secrets
from bot_platform.types import (
    Button,
    Capabilities,
    Inbound,
    InboundKind,
    Outgoing,
    SendResult,
)

if TYPE_CHECKING:
    import aiohttp
    from sqlalchemy import ColumnElement

    from bot_platform.config import BotConfig
    from bot_platform.kv import KeyValueStore


@dataclass(frozen=True, slots=True)
class WebhookRequest:
    """A webhook call as plain data, so adapters never depend on a web framework.

    ``headers`` keys are lower-case; ``body`` is the raw bytes (signatures are computed on
    them, never on re-serialized JSON).
    """

    method: str
    headers: Mapping[str, str]
    query: Mapping[str, str]
    body: bytes


@dataclass(frozen=True, slots=True)
class WebhookReply:
    """What the webhook endpoint answers when an adapter needs more than ``200 ok``."""

    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain"
    # Outbox rows whose message this reply carries (Viber's welcome message travels in the
    # webhook response): the endpoint marks them sent so the worker does not send them again.
    consumed_outbox_ids: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class HandledEvent:
    """One inbound event after the engine handled it: what it produced for the user."""

    inbound: Inbound
    duplicate: bool = False
    outbox_ids: tuple[int, ...] = ()
    replies: tuple[Outgoing, ...] = ()  # the messages queued for this user, in order


@runtime_checkable
class Channel(Protocol):
    """One bot on one messenger: the whole required contract.

    ``parse`` verifies and normalizes a webhook call (raising ``BadSignature`` or
    ``BadPayload``); ``send`` makes exactly one API call for one fitted part
    (``fit_message``) and reports what happened as a ``SendResult`` instead of raising.
    Everything else a messenger can do is an optional ``Supports*`` protocol below,
    checked with ``isinstance``: the core never probes a channel with ``getattr``.
    """

    name: str
    bot_id: str
    capabilities: Capabilities

    async def parse(self, request: WebhookRequest) -> list[Inbound]: ...

    async def send(self, recipient: str, message: Outgoing) -> SendResult: ...


@runtime_checkable
class SupportsSendMany(Protocol):
    """Optional: one API call for many recipients (Viber's ``broadcast_message``), up to
    ``capabilities.batch_size`` of them; a result per recipient."""

    async def send_many(
        self, recipients: Sequence[str], message: Outgoing
    ) -> dict[str, SendResult]: ...


@runtime_checkable
class SupportsCheck(Protocol):
    """Optional: prove the token and the network at start-up (``getMe``, ``GET /me``).
    Returns a display name; a refused token raises ``BadToken``, anything else is retried."""

    async def check(self) -> str: ...


@runtime_checkable
class SupportsSetup(Protocol):
    """Optional: register the webhook at the messenger when a public URL is configured."""

    async def setup(self, webhook_url: str) -> None: ...


InboundHandler = Callable[[Inbound], Awaitable[Any]]


@runtime_checkable
class SupportsPolling(Protocol):
    """Optional: fetch updates without a public URL (Telegram long polling); runs until
    cancelled."""

    async def poll(self, handler: InboundHandler) -> None: ...


@runtime_checkable
class SupportsReply(Protocol):
    """Optional: answer the webhook call itself (Facebook's GET handshake, Telegram's
    ``answerCallbackQuery`` in the response body). ``None`` means the default 200."""

    async def reply(
        self, request: WebhookRequest, handled: Sequence[HandledEvent]
    ) -> WebhookReply | None: ...


@runtime_checkable
class SupportsMessageReply(Protocol):
    """Optional: the webhook answer may carry one of the messages the event queued
    (Viber's welcome message travels in the ``conversation_started`` response: the user
    has not subscribed yet, so it cannot be sent otherwise). The endpoint holds the
    event's messages back from the worker until this has chosen, marks the ones it carried
    (``WebhookReply.consumed_outbox_ids``) sent, and releases the rest at once."""

    async def reply_with_message(
        self, request: WebhookRequest, handled: Sequence[HandledEvent]
    ) -> WebhookReply | None: ...


@runtime_checkable
class SupportsClaimScope(Protocol):
    """Optional: which outbox rows this process may deliver for the channel (the console
    keeps a terminal user's messages for that user's ``botp chat``)."""

    @property
    def claim_scope(self) -> ColumnElement[bool]: ...


@runtime_checkable
class SupportsClose(Protocol):
    """Optional: release what the adapter owns (aiogram's own HTTP session)."""

    async def close(self) -> None: ...


_SUPPORTED: dict[tuple[type, type], bool] = {}


def supports(channel: object, protocol: type) -> bool:
    """``isinstance(channel, protocol)`` for a runtime-checkable protocol, worked out once
    per adapter class: the check walks every member of the protocol each time, and the
    webhook endpoint asks it on every request (an adapter's capabilities are methods of
    its class, never set on one instance)."""
    key = (type(channel), protocol)
    found = _SUPPORTED.get(key)
    if found is None:
        found = _SUPPORTED[key] = isinstance(channel, protocol)
    return found


def connects(channel: Channel) -> bool:
    """Whether a channel has anything to connect to at start-up (a token to check, a
    webhook to register, updates to poll): the console has none."""
    return isinstance(channel, SupportsCheck | SupportsSetup | SupportsPolling)


class LongPayloads:
    """The one button-payload shortener. A payload longer than the channel's
    ``Capabilities.callback_payload_bytes`` (Telegram's callback data: 64 bytes) travels as
    a short token, stable for the same payload, and is kept in ``kv`` until the press
    brings the token back. Flows and agents write payloads of any length."""

    PREFIX = "~"

    def __init__(self, kv: KeyValueStore | None, channel: str, limit: int | None) -> None:
        self.kv = kv
        self.channel = channel
        self.limit = limit if kv is not None else None  # nowhere to keep them: as they are
        # "~" + hex digits within the limit (32 of them: 128 bits, when there is room)
        self.digest_size = 16 if limit is None else max(1, min(16, (limit - 1) // 2))

    def _key(self, token: str) -> str:
        return f"{self.channel}:payload:{token}"

    def _too_long(self, payload: str | None) -> bool:
        """Whether ``payload`` cannot travel as it is (one that looks like a token is
        stored too, so a press never restores the wrong thing)."""
        return self.limit is not None and payload is not None and (
            len(payload.encode()) > self.limit or payload.startswith(self.PREFIX))

    async def shorten(self, payload: str) -> str:
        """``payload`` as it may travel."""
        if not self._too_long(payload):
            return payload
        assert self.kv is not None
        token = self.PREFIX + hashlib.blake2b(
            payload.encode(), digest_size=self.digest_size).hexdigest()
        await self.kv.set(self._key(token), payload)
        return token

    async def restore(self, payload: str) -> str:
        """The payload a pressed button's token stands for (as it is when unknown)."""
        if self.kv is None or not payload.startswith(self.PREFIX):
            return payload
        return await self.kv.get(self._key(payload)) or payload

    async def shortened(self, message: Outgoing) -> Outgoing:
        """``message`` with every button, card button and quick reply payload as it may
        travel (for adapters that render a message in one synchronous step)."""
        if self.limit is None or not any(self._too_long(p) for p in (
                *(b.payload for b in message.buttons),
                *(q.payload for q in message.quick_replies),
                *(b.payload for c in message.cards for b in c.buttons))):
            return message  # the usual case: nothing to copy

        async def buttons(items: tuple[Button, ...]) -> tuple[Button, ...]:
            return tuple([b if b.payload is None else b.model_copy(
                update={"payload": await self.shorten(b.payload)}) for b in items])

        quick = [q.model_copy(update={"payload": await self.shorten(q.payload)})
                 if q.payload else q for q in message.quick_replies]
        cards = [c.model_copy(update={"buttons": await buttons(c.buttons)})
                 for c in message.cards]
        return message.model_copy(update={"buttons": await buttons(message.buttons),
                                          "quick_replies": tuple(quick),
                                          "cards": tuple(cards)})

    async def restored(self, event: Inbound) -> Inbound:
        """A button press with the payload its token stood for."""
        if event.kind != InboundKind.BUTTON or not event.payload or \
                not event.payload.startswith(self.PREFIX):
            return event
        return event.model_copy(update={"payload": await self.restore(event.payload)})


@dataclass(slots=True)
class ChannelDeps:
    """What the composition root hands every adapter: shared clients, never globals."""

    http: aiohttp.ClientSession | None
    kv: KeyValueStore


ChannelFactory = Callable[["BotConfig", ChannelDeps], Channel]

# Explicit registry (channel name -> "module:factory"); loaded lazily so the core never
# imports a messenger SDK it does not use.
BUILTIN_CHANNELS: dict[str, str] = {
    "console": "bots.console:build",
    "telegram": "bots.telegram:build",
    "viber": "bots.viber:build",
    "facebook": "bots.facebook:build",
}
# Channels that live in this process and need no credentials: the admin API registers
# every other registered channel (``admin_api/bots.py`` reads its list from here).
LOCAL_CHANNELS = frozenset({"console"})


def messenger_channels() -> tuple[str, ...]:
    """The registered channels bots can be added to through the admin API."""
    return tuple(name for name in BUILTIN_CHANNELS if name not in LOCAL_CHANNELS)


def load_channel_factory(channel: str) -> ChannelFactory:
    """Import the adapter factory registered for ``channel``. The bot's secrets are
    remembered before it is built, so no log line can carry them (whatever the adapter)."""
    target = BUILTIN_CHANNELS.get(channel)
    if target is None:
        known = ", ".join(sorted(BUILTIN_CHANNELS))
        raise ConfigError(f"unknown channel {channel!r} (known: {known})")
    module_name, _, attribute = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise ConfigError(f"channel {channel!r} is not available: {error}") from error
    factory: ChannelFactory = getattr(module, attribute)

    def build(bot: BotConfig, deps: ChannelDeps) -> Channel:
        remember_secrets(*(value.get_secret_value() for value in (
            bot.token, bot.secret, bot.verify_token) if value is not None))
        return factory(bot, deps)

    return build

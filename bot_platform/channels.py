"""The seam between the engine and a messenger: the ``Channel`` protocol and its registry.

A new messenger is one module in ``bots/`` exposing ``build(bot, deps) -> Channel`` plus one
line in ``BUILTIN_CHANNELS``. The core never imports a messenger SDK: adapters are loaded
by import string when a bot of that channel is configured.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from bot_platform.errors import ConfigError
from bot_platform.types import Capabilities, Inbound, Outgoing, SendResult

if TYPE_CHECKING:
    import aiohttp

    from bot_platform.clock import Clock
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
    """One bot on one messenger.

    ``parse`` verifies and normalizes a webhook call (raising ``BadSignature`` or
    ``BadPayload``); ``send`` delivers one message and reports what happened as a
    ``SendResult`` instead of raising.
    """

    name: str
    bot_id: str
    capabilities: Capabilities

    async def parse(self, request: WebhookRequest) -> list[Inbound]: ...

    async def send(self, recipient: str, message: Outgoing) -> SendResult: ...


class SupportsSendMany(Protocol):
    """Optional: one API call for many recipients (Viber's ``broadcast_message``)."""

    async def send_many(
        self, recipients: Sequence[str], message: Outgoing
    ) -> dict[str, SendResult]: ...


class SupportsSetup(Protocol):
    """Optional: register the webhook at the messenger when a public URL is configured."""

    async def setup(self, webhook_url: str) -> None: ...


class SupportsReply(Protocol):
    """Optional: answer the webhook call itself (Facebook's GET handshake, Viber's welcome
    message in the ``conversation_started`` response). ``None`` means the default 200."""

    async def reply(
        self, request: WebhookRequest, handled: Sequence[HandledEvent]
    ) -> WebhookReply | None: ...


InboundHandler = Callable[[Inbound], Awaitable[Any]]


class SupportsPolling(Protocol):
    """Optional: fetch updates without a public URL (Telegram long polling)."""

    async def poll(self, handler: InboundHandler) -> None: ...


@dataclass(slots=True)
class ChannelDeps:
    """What the composition root hands every adapter: shared clients, never globals."""

    http: aiohttp.ClientSession | None
    kv: KeyValueStore
    clock: Clock
    public_url: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


ChannelFactory = Callable[["BotConfig", ChannelDeps], Channel]

# Explicit registry (channel name -> "module:factory"); loaded lazily so the core never
# imports a messenger SDK it does not use.
BUILTIN_CHANNELS: dict[str, str] = {
    "console": "bots.console:build",
    "telegram": "bots.telegram:build",
    "viber": "bots.viber:build",
    "facebook": "bots.facebook:build",
}


def load_channel_factory(channel: str) -> ChannelFactory:
    """Import the adapter factory registered for ``channel``."""
    target = BUILTIN_CHANNELS.get(channel)
    if target is None:
        known = ", ".join(sorted(BUILTIN_CHANNELS))
        raise ConfigError(f"unknown channel {channel!r} (known: {known})")
    module_name, _, attribute = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise ConfigError(f"channel {channel!r} is not available: {error}") from error
    return getattr(module, attribute)

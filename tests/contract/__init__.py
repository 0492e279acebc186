"""Harnesses for the channel contract suite (``tests/test_channel_contract.py``).

The suite runs the same scenarios over every adapter in the channel registry, each
against its fake messenger. What differs per messenger lives in one ``Harness`` per
module here: how to build the bot on its fake, what a user's signed webhook looks like,
how to forge one, how to make the fake fail a call, and how to read what the fake
received as ``Delivered`` (what the person sees). A new messenger adds one module here
and one line in ``HARNESSES``.
"""

from __future__ import annotations

import importlib
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from bot_platform.config import BotConfig

Fault = Literal["429", "5xx"]


@dataclass(frozen=True)
class Delivered:
    """One message as the person sees it, whatever the messenger's wire format."""

    text: str = ""
    image: str | None = None
    choices: tuple[str, ...] = ()  # titles of buttons and quick replies, in order
    # Per choice, what pressing it sends back (a payload, callback data, a typed title;
    # None for a link or a "share my phone" key).
    replies: tuple[str | None, ...] = ()
    cards: tuple[str, ...] = ()  # titles of a native carousel's cards
    raw: Any = field(default=None, compare=False)  # the fake's record, for press()


class Harness(Protocol):
    """One messenger's side of the contract suite."""

    channel: str  # the registry name
    bot_id: str
    user: str  # the person the scenarios talk to

    def fake(self) -> AbstractAsyncContextManager[Any]:
        """The fake messenger server; ``start`` gets it once it runs."""
        ...

    def start(self, server: Any) -> None: ...

    def bot(self) -> BotConfig:
        """The bot's config, pointed at the fake."""
        ...

    def attach(self, platform: Any) -> None:
        """Tie the fake to a platform built on ``bot()`` (its clock, for windows)."""
        ...

    def webhook(self, number: int, text: str) -> tuple[bytes, dict[str, str]]:
        """The person's text message as a correctly signed webhook (body, headers);
        the same ``number`` gives the same event."""
        ...

    def forged(self, body: bytes) -> dict[str, str]:
        """Headers that claim to come from the messenger but do not."""
        ...

    def signed(self, body: bytes) -> dict[str, str]:
        """Valid headers for any body (a malformed one included)."""
        ...

    def sends(self) -> int:
        """How many send calls the fake answered so far (faults included)."""
        ...

    def fail(self, number: int, fault: Fault) -> None:
        """Make the ``number``-th send call (from 1) fail this way."""
        ...

    def block(self) -> None:
        """The person blocks the bot."""
        ...

    def delivered(self) -> list[Delivered]:
        """Every message the fake accepted for the person, in order."""
        ...

    def press(self, number: int, message: Delivered, index: int) -> tuple[bytes,
                                                                          dict[str, str]]:
        """The person presses the ``index``-th choice of ``message``: a signed webhook."""
        ...


class DictKV:
    """The key-value store an adapter gets, in memory (long payloads, offsets)."""

    def __init__(self) -> None:
        self.data: dict[str, str] = {}

    async def get(self, key: str) -> str | None:
        return self.data.get(key)

    async def set(self, key: str, value: str) -> None:
        self.data[key] = value


# Channel (as in ``BUILTIN_CHANNELS``) -> "module:class" of its harness. The suite
# fails for a registered channel that has none.
HARNESSES: dict[str, str] = {
    "telegram": "tests.contract.telegram:TelegramHarness",
    "viber": "tests.contract.viber:ViberHarness",
    "facebook": "tests.contract.facebook:FacebookHarness",
    "console": "tests.contract.console:ConsoleHarness",
}


def load_harness(channel: str) -> Harness:
    module_name, _, name = HARNESSES[channel].partition(":")
    harness: Harness = getattr(importlib.import_module(module_name), name)()
    return harness

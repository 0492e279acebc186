"""The console channel: talk to the bot from a terminal (``botp chat``) through the real
pipeline (database, engine, scheduler, delivery). It is also reachable as a webhook
(``POST /webhooks/console/console`` with ``{"user_id": "...", "text": "..."}``), which
makes it handy for scripted smoke tests.
"""

from __future__ import annotations

import itertools
import math
import uuid
from collections.abc import Callable
from typing import Any

import aiohttp
from pydantic import ValidationError

from bot_platform.channels import ChannelDeps, WebhookRequest
from bot_platform.config import BotConfig
from bot_platform.edge import expect_str, load_json
from bot_platform.errors import BadPayload
from bot_platform.types import (
    Button,
    Capabilities,
    Inbound,
    InboundKind,
    Outgoing,
    Profile,
    QuickReply,
    SendResult,
)


def _id(value: Any, what: str) -> str:
    """A string, or a number written as one (the console accepts ``"user_id": 7``)."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise BadPayload(f"console webhook needs {what} as a string")
    return str(value)


CONSOLE_CAPABILITIES = Capabilities(
    max_text_length=4096, max_buttons=10, max_button_title=64, quick_replies=True,
    max_quick_replies=13,
    carousels=False, messages_per_second=math.inf, per_chat_per_second=math.inf,
)


def render(message: Outgoing) -> str:
    """A message as terminal text: numbered choices, links shown in full."""
    lines = [message.text] if message.text else []
    if message.image_url:
        lines.append(f"[image] {message.image_url}")
    choices: list[Button | QuickReply] = [*message.buttons, *message.quick_replies]
    for number, choice in enumerate(choices, start=1):
        url = getattr(choice, "url", None)
        if url:
            lines.append(f"  [{number}] {choice.title} -> {url}")
        elif getattr(choice, "request", None) == "phone":
            lines.append(f"  [{number}] {choice.title} (send /phone +123456789)")
        else:
            lines.append(f"  [{number}] {choice.title}")
    return "\n".join(lines)


class ConsoleChannel:
    """A channel whose "messenger" is a terminal (or any callable that takes text).

    With ``relay_url`` set (``api_base`` in the bot config) every message is also POSTed as
    JSON to ``{relay_url}/send``: a development UI, or a test's recording server, sees what
    the bot says, with HTTP errors mapped to send results like a real messenger's.
    """

    name = "console"
    capabilities = CONSOLE_CAPABILITIES

    def __init__(self, bot_id: str, output: Callable[[str, str], None] | None = None,
                 relay_url: str | None = None, http: aiohttp.ClientSession | None = None
                 ) -> None:
        self.bot_id = bot_id
        self.output = output or (lambda user, text: print(f"bot> {text}\n", flush=True))
        self.relay_url = relay_url.rstrip("/") if relay_url else None
        self.http = http
        self.sent: list[tuple[str, Outgoing]] = []
        self._choices: dict[str, list[Button | QuickReply]] = {}
        self._ids = itertools.count(1)

    def inbound(self, user_id: str, line: str, profile: Profile | None = None) -> Inbound:
        """Turn a typed line into an event: ``/start [ref]``, a choice (its exact title or
        its number), ``/phone N``, or plain text."""
        line = line.strip()
        common: dict[str, Any] = {
            "channel": self.name, "bot_id": self.bot_id, "user_id": user_id,
            "event_id": uuid.uuid4().hex, "profile": profile or Profile()}
        if line == "/start" or line.startswith("/start "):
            ref = line.removeprefix("/start").strip() or None
            return Inbound(kind=InboundKind.START, ref=ref, **common)
        if line.startswith("/phone "):
            phone = line.removeprefix("/phone ").strip()
            profile = (profile or Profile()).model_copy(update={"phone": phone})
            return Inbound(**{**common, "kind": InboundKind.CONTACT, "profile": profile})
        choices = self._choices.get(user_id, [])
        titled = [i for i, c in enumerate(choices) if c.title.strip() == line]
        index = titled[0] if titled else (int(line) - 1 if line.isdigit() else -1)
        if 0 <= index < len(choices):
            choice = choices[index]
            if choice.payload:  # a URL button has none: typing its number is just text
                return Inbound(kind=InboundKind.BUTTON, payload=choice.payload,
                               text=choice.title, **common)
            if isinstance(choice, QuickReply):
                return Inbound(kind=InboundKind.TEXT, text=choice.title, **common)
        return Inbound(kind=InboundKind.TEXT, text=line, **common)

    async def parse(self, request: WebhookRequest) -> list[Inbound]:
        body = load_json(request.body)
        if not isinstance(body, dict):
            raise BadPayload("console webhook needs a JSON object with user_id and text")
        try:
            user_id = _id(body.get("user_id"), "user_id")
            text = _id(body.get("text"), "text")
            event_id = body.get("event_id")
            profile = Profile(first_name=expect_str(body.get("first_name"), "first_name"),
                              language=expect_str(body.get("language"), "language"))
            event = self.inbound(user_id, text, profile)
            if event_id:
                event = Inbound.model_validate(
                    {**event.model_dump(), "event_id": _id(event_id, "event_id")})
        except ValidationError as error:
            raise BadPayload(f"console webhook: {error.error_count()} invalid value(s)") \
                from error
        return [event]

    async def send(self, recipient: str, message: Outgoing) -> SendResult:
        message_id = f"console-{next(self._ids)}"
        if self.relay_url and self.http is not None:
            result = await self._relay(recipient, message)
            if result.message_id is None:
                return result
            message_id = result.message_id
        self.sent.append((recipient, message))
        choices = [*message.buttons, *message.quick_replies]
        if choices:
            self._choices[recipient] = choices
        self.output(recipient, render(message))
        return SendResult.sent(message_id)

    async def _relay(self, recipient: str, message: Outgoing) -> SendResult:
        assert self.http is not None
        body = {"bot_id": self.bot_id, "recipient": recipient,
                "message": message.model_dump(mode="json")}
        try:
            async with self.http.post(f"{self.relay_url}/send", json=body) as response:
                if response.status == 429:
                    return SendResult.retry(float(response.headers.get("Retry-After", "1")))
                if response.status == 403:
                    return SendResult.blocked()
                if response.status >= 500:
                    return SendResult.transient(f"relay answered {response.status}")
                if response.status >= 400:
                    return SendResult.failed(f"relay answered {response.status}")
                data = await response.json()
                return SendResult.sent(str(data.get("message_id")))
        except (aiohttp.ClientError, TimeoutError) as error:
            return SendResult.transient(f"relay unreachable: {type(error).__name__}")


def build(bot: BotConfig, deps: ChannelDeps) -> ConsoleChannel:
    return ConsoleChannel(bot.id, relay_url=bot.api_base, http=deps.http)

"""The console channel: talk to the bot from a terminal (``botp chat``) through the real
pipeline (database, engine, scheduler, delivery). ``botp chat`` runs the platform in its
own process and hands typed lines to the engine directly: no HTTP involved.

Over HTTP (``POST /webhooks/console/console`` with ``{"user_id": "...", "text": "..."}``,
handy for scripted smoke tests) it answers only when a secret is configured
(``BOTP_CONSOLE_SECRET``, or ``secret`` in the console bot's config) and the call carries
it in ``X-Botp-Console-Secret``; without a secret the webhook does not exist (404). Anyone
who can reach it could otherwise create subscribers, open chats and collect promo codes.
"""

from __future__ import annotations

import hmac
import itertools
import json
import math
import uuid
from collections.abc import Callable
from typing import Any

import aiohttp

from bot_platform.channels import ChannelDeps, WebhookRequest
from bot_platform.config import BotConfig
from bot_platform.errors import BadPayload, BadSignature, UnknownBot
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

CONSOLE_CAPABILITIES = Capabilities(
    max_text_length=4096, max_buttons=10, max_button_title=64, quick_replies=True,
    max_quick_replies=13,
    carousels=False, messages_per_second=math.inf, per_chat_per_second=math.inf,
)
SECRET_HEADER = "x-botp-console-secret"


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
                 relay_url: str | None = None, http: aiohttp.ClientSession | None = None,
                 webhook_secret: str | None = None) -> None:
        self.bot_id = bot_id
        self.webhook_secret = webhook_secret
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

    def verify(self, request: WebhookRequest) -> None:
        """The webhook is off without a secret (404) and forbidden without the right one."""
        if not self.webhook_secret:
            raise UnknownBot("the console webhook is off (no console secret configured)")
        given = request.headers.get(SECRET_HEADER, "")
        if not hmac.compare_digest(given.encode(), self.webhook_secret.encode()):
            raise BadSignature("missing or wrong X-Botp-Console-Secret")

    async def parse(self, request: WebhookRequest) -> list[Inbound]:
        self.verify(request)
        try:
            body = json.loads(request.body)
            user_id, text = str(body["user_id"]), str(body["text"])
        except (ValueError, KeyError, TypeError) as error:
            raise BadPayload(f"console webhook needs JSON user_id and text: {error}") from error
        event = self.inbound(user_id, text, Profile(
            first_name=body.get("first_name"), language=body.get("language")))
        if body.get("event_id"):
            event = event.model_copy(update={"event_id": str(body["event_id"])})
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
    secret = bot.secret.get_secret_value() if bot.secret else None
    return ConsoleChannel(bot.id, relay_url=bot.api_base, http=deps.http,
                          webhook_secret=secret)

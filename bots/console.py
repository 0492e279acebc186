"""The console channel: talk to the bot from a terminal (``botp chat``) through the real
pipeline (database, engine, scheduler, delivery). ``botp chat`` runs the platform in its
own process and hands typed lines to the engine directly: no HTTP involved.

Each ``botp chat`` is the terminal of one console user: the first time it runs it marks
that user as a terminal user (a ``kv`` row), and from then on that user's messages are
delivered only by a ``botp chat`` of that user (they wait in the outbox while none runs,
like messages in a messenger's inbox). Other processes (``botp run``, another ``botp
chat``) leave them alone, and print nothing they deliver to console users. ``/wait`` moves
only that user's own timers and held messages earlier: time is never moved for anyone
else, and no row gets a timestamp in the future.

Over HTTP (``POST /webhooks/console/console`` with ``{"user_id": "...", "text": "..."}``,
handy for scripted smoke tests) it answers only when a secret is configured
(``BOTP_CONSOLE_SECRET``, or ``secret`` in the console bot's config) and the call carries
it in ``X-Botp-Console-Secret``; without a secret the webhook does not exist (404). Anyone
who can reach it could otherwise create subscribers, open chats and collect promo codes.
"""

from __future__ import annotations

import hmac
import itertools
import logging
import math
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import aiohttp
from pydantic import ValidationError
from sqlalchemy import ColumnElement, and_, exists, literal, or_, select, update

from bot_platform import outbox
from bot_platform.channels import ChannelDeps, WebhookRequest
from bot_platform.config import BotConfig
from bot_platform.database import Database
from bot_platform.edge import expect_str, load_json
from bot_platform.errors import BadPayload, BadSignature, UnknownBot
from bot_platform.models import Job, KeyValue, Outbox, Subscriber
from bot_platform.statuses import JobStatus
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
SECRET_HEADER = "x-botp-console-secret"
TERMINAL_KEY = "console:terminal:"  # + bot id + ":" + user id: a user of a ``botp chat``
# Messages and users' choices kept in memory: a console bot in a server (a relay, a
# benchmark) held every message it ever sent (45,000 after a 60 s timer wave, each full
# garbage collection walking them: 0.3-0.7 s apiece).
KEEP = 1_000
log = logging.getLogger(__name__)


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
                 webhook_secret: str | None = None, terminal_user: str | None = None) -> None:
        self.bot_id = bot_id
        self.webhook_secret = webhook_secret
        # The user this process is the terminal of (``botp chat``); None in a server.
        self.terminal_user = terminal_user
        self.output = output or (
            (lambda user, text: print(f"bot> {text}\n", flush=True)) if terminal_user
            else (lambda user, text: log.debug("console message for %s: %s", user, text)))
        self.relay_url = relay_url.rstrip("/") if relay_url else None
        self.http = http
        # The latest messages (tests read them) and recent users' choices, ``KEEP`` each.
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
        if len(self.sent) > KEEP:
            del self.sent[:KEEP // 2]
        # Numbers press buttons of the last message only: after a question without
        # buttons (an age, an email) a typed number is the answer, not an old button.
        self._choices.pop(recipient, None)  # re-inserted: the dict is oldest-first
        self._choices[recipient] = [*message.buttons, *message.quick_replies]
        if len(self._choices) > KEEP:
            del self._choices[next(iter(self._choices))]
        if self.terminal_user is None or recipient == self.terminal_user:
            self.output(recipient, render(message))
        return SendResult.sent(message_id)

    @property
    def claim_scope(self) -> ColumnElement[bool]:
        """Which outbox rows this process may deliver: all but this bot's rows of terminal
        users, except, in a ``botp chat``, its own user's."""
        attached = exists().where(
            KeyValue.key == literal(f"{TERMINAL_KEY}{self.bot_id}:") + Outbox.recipient)
        scope = [Outbox.channel != self.name, Outbox.bot_id != self.bot_id, ~attached]
        if self.terminal_user is not None:
            scope.append(Outbox.recipient == self.terminal_user)
        return or_(*scope)

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


async def attach_terminal(kv: Any, bot_id: str, user_id: str) -> None:
    """Mark ``user_id`` as a ``botp chat`` user: only such a process delivers its messages."""
    await kv.set(f"{TERMINAL_KEY}{bot_id}:{user_id}", "botp chat")


async def fast_forward(db: Database, clock: Any, bot_id: str, user_id: str,
                       delta: timedelta) -> int:
    """The console's ``/wait``: the user's own pending timers and held messages become due
    ``delta`` earlier, as if that much time had passed for them alone. Nothing else moves:
    other subscribers' timers, broadcasts and every timestamp stay on the real clock.
    Each row moves with a compare-and-set on its status and old time (a worker may be
    running it at that moment). Returns how many rows moved."""
    moved = 0
    async with db.session() as session:
        subscriber_id = await session.scalar(select(Subscriber.id).where(
            Subscriber.channel == "console", Subscriber.bot_id == bot_id,
            Subscriber.user_id == user_id))
        if subscriber_id is None:
            return 0
        now = clock.now()
        jobs = (await session.execute(select(Job.id, Job.due_at).where(
            Job.subscriber_id == subscriber_id, Job.status == JobStatus.PENDING,
            Job.due_at > now))).all()
        for job_id, due_at in jobs:
            result = await session.execute(update(Job).where(and_(
                Job.id == job_id, Job.status == JobStatus.PENDING, Job.due_at == due_at,
            )).values(due_at=max(due_at - delta, now)))
            moved += result.rowcount or 0
        moved += await outbox.bring_forward(session, subscriber_id, delta, now)
    return moved

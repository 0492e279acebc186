"""A channel whose send results are scripted per call, and what tests of delivery need
around it: a /start on it, a second worker on the same database, the outbox rows."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Iterable
from typing import Any

from sqlalchemy import select

from bot_platform.delivery import Delivery
from bot_platform.models import Outbox
from bot_platform.own_replies import OwnReplies
from bot_platform.types import Capabilities, Inbound, InboundKind, Outgoing, SendResult


class ScriptedChannel:
    """A channel whose send results are scripted per call (then "sent")."""

    name = "scripted"

    def __init__(self, results: Iterable[SendResult] = (), **caps: object) -> None:
        self.bot_id = "b1"
        self.capabilities = Capabilities(messages_per_second=math.inf,
                                         per_chat_per_second=math.inf, **caps)
        self.results = list(results)
        self.calls: list[tuple[str, Outgoing, str]] = []

    async def parse(self, request):  # pragma: no cover - not used
        return []

    async def send(self, recipient: str, message: Outgoing) -> SendResult:
        result = self.results.pop(0) if self.results else SendResult.sent(
            f"m{len(self.calls) + 1}")
        self.calls.append((recipient, message, result.status.value))
        return result

    def delivered(self) -> list[tuple[str, str]]:
        return [(r, m.text[:10]) for r, m, status in self.calls if status == "sent"]


def start(user: str = "u1", event: str = "e1") -> Inbound:
    """A /start from ``user`` on the scripted channel."""
    return Inbound(channel="scripted", bot_id="b1", user_id=user, event_id=event,
                   kind=InboundKind.START)


def another_worker(platform: Any) -> Delivery:
    """A second worker's delivery on the same database (another process, in effect)."""
    return Delivery(platform.db, platform.channel, platform.bot, platform.limiter,
                    platform.clock, platform.settings.worker, "other-worker")


async def outbox_rows(platform: Any) -> list[Outbox]:
    async with platform.db.session() as session:
        return list((await session.scalars(select(Outbox).order_by(Outbox.id))).all())


@contextlib.asynccontextmanager
async def web_sends(platform: Any) -> AsyncIterator[OwnReplies]:
    """The web process's own sender running, as ``botp web`` runs it (no worker)."""
    stop = asyncio.Event()
    task = asyncio.create_task(platform.replies.run(stop, 5.0))
    await asyncio.sleep(0)
    try:
        yield platform.replies
    finally:
        stop.set()
        await task

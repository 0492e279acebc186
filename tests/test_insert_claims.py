"""A turn's reply claimed by its own insert (``insert_claims``, PostgreSQL): ``sending``
and locked by this process when nothing of the subscriber is unsent ahead of it but the
rows this process holds; ``pending`` (for the workers) behind any other unsent row; and
a turn's rows through the web's own sender go out with one statement less."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import select

from bot_platform.config import BotConfig
from bot_platform.insert_claims import InsertClaim
from bot_platform.models import Subscriber
from bot_platform.types import Outgoing
from tests.support.platform import wait_for
from tests.support.scripted import ScriptedChannel, outbox_rows, start

pytestmark = pytest.mark.postgres


async def _platform(make_platform: Any, postgres_url: str) -> Any:
    return await make_platform(bots=[BotConfig(id="b1", channel="scripted")],
                               channel_overrides={("scripted", "b1"): ScriptedChannel()},
                               database_url=postgres_url)


def _claim(platform: Any, ahead: list[int] | None = None) -> InsertClaim:
    started, until = platform.replies.delivery.outbox.leases.starting()
    return InsertClaim("web-1", ahead or [], 0, started, until)


async def _enqueue(platform: Any, text: str, claim: InsertClaim | None) -> int:
    async with platform.engine.turns.isolated(("scripted", "b1", "u1")) as session:
        subscriber = await session.scalar(select(Subscriber).where(Subscriber.user_id == "u1"))
        [(row_id, _)] = await platform.outbox.enqueue(
            session, subscriber, [(None, Outgoing(text=text))], claim=claim)
    return row_id


async def test_a_reply_with_nothing_ahead_is_inserted_claimed(make_platform,
                                                              postgres_url) -> None:
    platform = await _platform(make_platform, postgres_url)
    await platform.engine.handle(start())  # the subscriber; its welcome stays pending
    [welcome] = await outbox_rows(platform)
    async with platform.engine.turns.isolated(("scripted", "b1", "u1")) as session:
        await session.execute(select(1))
    # Behind the unsent welcome (not this process's): pending, nothing claimed.
    behind = _claim(platform)
    first = await _enqueue(platform, "behind a worker's row", behind)
    assert behind.decided == {first} and behind.claimed == []
    # The welcome and that row in this process's line (``ahead``): claimed.
    ahead = _claim(platform, [welcome.id, first])
    second = await _enqueue(platform, "behind our own rows", ahead)
    assert ahead.decided == {second}
    [row] = ahead.rows()
    assert (row.id, row.recipient, row.payload["text"], row.attempts, row.urgent) == (
        second, "u1", "behind our own rows", 0, True)
    assert row.subscriber_status == "subscribed"
    rows = {row.id: row for row in await outbox_rows(platform)}
    assert (rows[first].status, rows[first].locked_by) == ("pending", None)
    assert (rows[second].status, rows[second].locked_by) == ("sending", "web-1")
    assert rows[second].lease_expires_at is not None
    # Without a claim the insert is as it was.
    plain = await _enqueue(platform, "no claim", None)
    assert {r.id: r.status for r in await outbox_rows(platform)}[plain] == "pending"


async def test_the_webs_replies_are_claimed_by_their_insert_and_sent_in_order(
        make_platform, postgres_url) -> None:
    platform = await _platform(make_platform, postgres_url)
    calls: list[int] = []
    queued = platform.replies.delivery.outbox.claim_queued

    async def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return await queued(*args, **kwargs)

    platform.replies.delivery.outbox.claim_queued = counted
    stop = asyncio.Event()
    task = asyncio.create_task(platform.replies.run(stop, 5.0))
    await asyncio.sleep(0)
    try:
        for n in range(3):
            await platform.engine.handle(start(event=f"e{n}"))

        async def all_sent() -> bool:
            rows = await outbox_rows(platform)
            return bool(rows) and all(row.status == "sent" for row in rows)

        await wait_for(all_sent, what="every reply, no worker running")
    finally:
        stop.set()
        await task
    assert calls == []  # no claim statement of its own

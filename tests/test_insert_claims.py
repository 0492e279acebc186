"""A turn's reply claimed by its own insert (``insert_claims``, PostgreSQL): ``sending``
and locked by this process when nothing of the subscriber is unsent ahead of it but the
rows this process holds; ``pending`` (for the workers) behind any other unsent row; and
a turn's rows through the web's own sender go out with one statement less."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import asyncpg
import pytest
from sqlalchemy import select
from sqlalchemy.engine import make_url

from bot_platform.config import BotConfig
from bot_platform.inbound import EventContext, Next
from bot_platform.insert_claims import InsertClaim
from bot_platform.models import Outbox, Subscriber
from bot_platform.types import Outgoing
from tests.support.platform import wait_for
from tests.support.scripted import ScriptedChannel, outbox_rows, start, web_sends

pytestmark = pytest.mark.postgres


async def _platform(make_platform: Any, postgres_url: str) -> Any:
    return await make_platform(bots=[BotConfig(id="b1", channel="scripted")],
                               channel_overrides={("scripted", "b1"): ScriptedChannel()},
                               database_url=postgres_url)


def _claim(platform: Any, ahead: list[int] | None = None) -> InsertClaim:
    started, until = platform.replies.delivery.outbox.leases.starting()
    return InsertClaim("web-1", ahead or [], 0, started, until)


def _count_claims(platform: Any) -> list[int]:
    """The web's claims by a statement of their own (``claim_queued``), counted."""
    calls: list[int] = []
    outbox = platform.replies.delivery.outbox
    queued = outbox.claim_queued

    async def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return await queued(*args, **kwargs)

    outbox.claim_queued = counted
    return calls


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
    calls = _count_claims(platform)
    async with web_sends(platform):
        for n in range(3):
            await platform.engine.handle(start(event=f"e{n}"))

        async def all_sent() -> bool:
            rows = await outbox_rows(platform)
            return bool(rows) and all(row.status == "sent" for row in rows)

        await wait_for(all_sent, what="every reply, no worker running")
    assert calls == []  # no claim statement of its own


async def _all_sent(platform: Any) -> bool:
    rows = await outbox_rows(platform)
    return bool(rows) and all(row.status == "sent" for row in rows)


async def test_a_bad_event_rolls_its_claimed_reply_back_and_one_run_alone_claims_again(
        make_platform, postgres_url) -> None:
    """In one group: u2's event fails after its reply was inserted claimed (rolled back
    with its savepoint: no row, nothing held), u3's meets another transaction's lock and
    runs again alone (its claim undone, claimed anew by ``claim_queued``); u1's goes
    out. Every row that stays is sent once, none is left ``sending``."""
    platform = await _platform(make_platform, postgres_url)
    engine, key = platform.engine, 535353
    tries = itertools.count()

    async def step(context: EventContext, call_next: Next) -> None:
        await call_next(context)
        user = context.inbound.user_id
        if user == "u2":
            raise RuntimeError("a bad event")
        if user == "u3" and next(tries) == 0:
            assert context.connection is not None
            await context.connection.simple(f"SET LOCAL lock_timeout = '50ms'; "
                                            f"SELECT pg_advisory_xact_lock({key})")
    engine.steps.append(step)
    calls = _count_claims(platform)
    url = make_url(platform.db.url).set(drivername="postgresql")
    other = await asyncpg.connect(url.render_as_string(hide_password=False))
    try:
        await other.execute("SELECT pg_advisory_lock($1)", key)
        async with web_sends(platform):
            results = await asyncio.gather(*(engine.handle(start(user=u, event=f"e-{u}"))
                                             for u in ("u1", "u2", "u3")),
                                           return_exceptions=True)
            await wait_for(lambda: _all_sent(platform), what="u1's and u3's replies")
            assert not platform.replies._lines
    finally:
        await other.close()
    assert isinstance(results[1], RuntimeError)
    assert next(tries) == 2  # u3 ran twice
    assert calls == [1]  # u3's run alone; u1's reply was claimed by its insert
    async with platform.db.session() as session:
        users = (await session.execute(select(Subscriber.user_id, Outbox.status).join(
            Outbox, Outbox.subscriber_id == Subscriber.id))).all()
    assert {user for user, _ in users} == {"u1", "u3"}
    assert {status for _, status in users} == {"sent"}
    sent = [recipient for recipient, _, _ in platform.channel("scripted", "b1").calls]
    assert sorted(sent) == sorted(row.recipient for row in await outbox_rows(platform))

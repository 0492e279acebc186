"""Group commit of inbound events on PostgreSQL (bot_platform/event_groups.py): the SQLite
tests of ``test_event_groups`` on PostgreSQL, and what only PostgreSQL has: other
processes holding subscribers' advisory locks. An event whose subscriber is busy
elsewhere runs alone instead of making its group wait; two platforms on one database
(two ``web`` processes) feeding overlapping subscribers never deadlock and process every
event once, in each subscriber's order."""

from __future__ import annotations

import asyncio
import itertools
import logging
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from bot_platform.errors import StorageUnavailable
from bot_platform.inbound import EventContext, Next
from bot_platform.models import Message, Outbox, ProcessedEvent, Subscriber
from bot_platform.turns import advisory_key
from tests import test_event_groups as on_sqlite
from tests.support.engine import echo_flows

pytestmark = pytest.mark.postgres


@pytest.fixture
def make_pg_platform(make_platform: Any, postgres_url: str) -> Any:
    """``make_platform`` on one fresh PostgreSQL database (every platform shares it)."""
    async def factory(**overrides: Any) -> Any:
        return await make_platform(database_url=postgres_url, **overrides)
    return factory


def dsn(platform: Any) -> str:
    return make_url(platform.db.url).set(drivername="postgresql").render_as_string(
        hide_password=False)


@pytest.mark.parametrize("how", ["raise", "flush", "early"])
async def test_a_bad_event_in_a_group_rolls_back_only_itself(
        make_pg_platform: Any, how: str, caplog: pytest.LogCaptureFixture) -> None:
    await on_sqlite.test_a_bad_event_in_a_group_rolls_back_only_itself(
        make_pg_platform, how, caplog)


async def test_a_duplicate_webhook_among_a_group_is_processed_once(
        make_pg_platform: Any) -> None:
    await on_sqlite.test_a_duplicate_webhook_among_a_group_is_processed_once(make_pg_platform)


async def test_each_subscribers_events_apply_in_order_across_groups(
        make_pg_platform: Any, tmp_path: Path) -> None:
    await on_sqlite.test_each_subscribers_events_apply_in_order_across_groups(
        make_pg_platform, tmp_path)


async def test_an_event_whose_subscriber_is_busy_elsewhere_runs_alone(
        make_pg_platform: Any) -> None:
    """Another process (a worker's timer batch) holds u1's advisory lock: u1's event
    leaves its group and waits alone, its neighbours commit meanwhile; when the lock
    is let go, u1's event goes through, once."""
    platform = await make_pg_platform()
    console, engine = platform.channel("console", "console"), platform.engine
    other = await asyncpg.connect(dsn(platform))
    try:
        holder = other.transaction()
        await holder.start()
        await other.execute("SELECT pg_advisory_xact_lock($1)",
                            advisory_key("console", "console", "u1"))
        waiting = asyncio.ensure_future(engine.handle(console.inbound("u1", "/start")))
        others = await asyncio.gather(*(engine.handle(console.inbound(u, "/start"))
                                        for u in ("u2", "u3")))
        assert all(r.outbox_ids for r in others)  # committed while u1 was held up
        assert not waiting.done()
        assert engine.groups.passed == 1
        await holder.rollback()
        result = await waiting
    finally:
        await other.close()
    assert result.outbox_ids and not result.duplicate
    assert await on_sqlite.count(platform, ProcessedEvent) == 3
    assert await on_sqlite.subscribers(platform) == {"u1", "u2", "u3"}


async def test_an_event_that_meets_another_transactions_lock_runs_alone(
        make_pg_platform: Any) -> None:
    """A statement of an event in a group fails for another transaction's lock (as a
    deadlock the server broke would): the event is rolled back to its savepoint and
    runs again alone; its neighbours commit in their group; all of it once."""
    platform = await make_pg_platform()
    console, engine = platform.channel("console", "console"), platform.engine
    key = 424242
    tries = itertools.count()

    async def step(context: EventContext, call_next: Next) -> None:
        await call_next(context)
        if context.inbound.user_id == "u2" and next(tries) == 0:
            connection = context.connection
            assert connection is not None
            await connection.simple(f"SET LOCAL lock_timeout = '50ms'; "
                                    f"SELECT pg_advisory_xact_lock({key})")
    engine.steps.append(step)
    other = await asyncpg.connect(dsn(platform))
    try:
        await other.execute("SELECT pg_advisory_lock($1)", key)
        groups = engine.groups.groups
        results = await asyncio.gather(*(engine.handle(console.inbound(u, "/start"))
                                         for u in ("u1", "u2", "u3")))
    finally:
        await other.close()
    assert all(r.outbox_ids and not r.duplicate for r in results)
    assert engine.groups.passed == 1 and next(tries) == 2  # ran twice, kept once
    assert engine.groups.groups == groups + 1  # u1 and u3 (u2 alone, in no group)
    assert await on_sqlite.count(platform, ProcessedEvent) == 3
    assert await on_sqlite.count(platform, Message) == 3 + 3  # /start in, welcome out
    async with platform.db.session() as session:
        per_user = dict((await session.execute(
            select(Subscriber.user_id, func.count(Outbox.id))
            .join(Outbox, Outbox.subscriber_id == Subscriber.id)
            .group_by(Subscriber.user_id))).all())
    assert len(set(per_user.values())) == 1 and set(per_user) == {"u1", "u2", "u3"}


async def test_two_processes_feeding_the_same_subscribers_never_deadlock(
        make_pg_platform: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Two platforms on one database (two ``web`` processes) handle events for the same
    subscribers at once, and each event twice (the messenger re-sent it to the other
    process): no error (a deadlock would be one), every event once, and each
    subscriber's events applied in the order they were sent."""
    flows = echo_flows(tmp_path)
    a = await make_pg_platform(flows_dir=flows)
    b = await make_pg_platform(flows_dir=flows)
    users = [f"u{n}" for n in range(12)]
    console_a = a.channel("console", "console")
    await asyncio.gather(*(a.engine.handle(console_a.inbound(u, "/start")) for u in users))
    rounds = 12

    async def feed(user: str, offset: int) -> None:
        for n in range(rounds):
            event = console_a.inbound(user, str(n))
            first, second = (a, b) if (n + offset) % 2 else (b, a)
            await asyncio.gather(first.engine.handle(event), second.engine.handle(event))

    with caplog.at_level(logging.INFO, "bot_platform.event_groups"):
        await asyncio.gather(*(feed(u, i) for i, u in enumerate(users)))
    assert "deadlock" not in caplog.text.lower()
    async with a.db.session() as session:
        logs = dict((await session.execute(
            select(Subscriber.user_id, Subscriber.attributes))).all())
        inbound = await session.scalar(select(func.count()).select_from(Message).where(
            Message.direction == "in"))
    expected = "," + ",".join(str(n) for n in range(rounds))
    assert {u: logs[u]["log"] for u in users} == {u: expected for u in users}
    assert inbound == len(users) * (rounds + 1)  # each event recorded once
    assert await on_sqlite.count(a, ProcessedEvent) == len(users) * (rounds + 1)
    grouped = a.engine.groups.groups + b.engine.groups.groups
    assert grouped < 2 * len(users) * rounds  # events shared transactions


async def test_a_connection_lost_under_a_group_runs_its_other_events_again(
        make_pg_platform: Any, caplog: pytest.LogCaptureFixture) -> None:
    """The group's connection dies under an event (a server restart, a killed backend):
    the whole transaction is gone; that event answers "unavailable" (a 503: sent again
    later), the events that had finished in the group run again in a new one, once."""
    platform = await make_pg_platform()
    console, engine = platform.channel("console", "console"), platform.engine
    killed = itertools.count()

    async def step(context: EventContext, call_next: Next) -> None:
        await call_next(context)
        if context.inbound.user_id == "bad" and next(killed) == 0:
            connection = context.connection
            assert connection is not None
            await connection.simple("SELECT pg_terminate_backend(pg_backend_pid())")
    engine.steps.append(step)
    events = [console.inbound(user, "/start") for user in on_sqlite.USERS]
    with caplog.at_level(logging.INFO, "bot_platform.event_groups"):
        results = await asyncio.gather(*(engine.handle(e) for e in events),
                                       return_exceptions=True)
    assert isinstance(results[1], StorageUnavailable)
    assert all(r.outbox_ids and not r.duplicate for i, r in enumerate(results) if i != 1)
    assert "running again" in caplog.text
    assert await on_sqlite.subscribers(platform) == {"u1", "u2", "u3"}
    again = await engine.handle(events[1])  # the messenger sends it again
    assert again.outbox_ids and not again.duplicate
    assert await on_sqlite.count(platform, ProcessedEvent) == 4
    async with platform.db.session() as session:
        per_user = dict((await session.execute(
            select(Subscriber.user_id, func.count(Outbox.id))
            .join(Outbox, Outbox.subscriber_id == Subscriber.id)
            .group_by(Subscriber.user_id))).all())
    assert set(per_user) == set(on_sqlite.USERS) and len(set(per_user.values())) == 1

"""PostgreSQL's driver path (bot_platform/pg_driver.py): deferred writes merged into the
next statement only where that cannot change what they do, a webhook's take-over all or
nothing in one statement, connections that die in the pool cost at most one failed unit
of work (a 503), never a stuck pool, and a turn's NOTIFY wakes only the loop that has
work from it."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from types import SimpleNamespace

import asyncpg
import pytest
from sqlalchemy import and_, select, text

from bot_platform import pg_driver
from bot_platform.database import Database, listen
from bot_platform.direct import direct
from bot_platform.errors import StorageUnavailable
from bot_platform.models import Message, Outbox
from bot_platform.outbox import INTERACTIVE, WORK_CHANNEL, notify_workers
from bot_platform.outbox_claims import OutboxClaims
from bot_platform.statuses import MessageStatus, OutboxStatus
from bot_platform.turns import UPDATE_SUBSCRIBER
from bot_platform.worker import Worker
from tests.support.platform import wait_for
from tests.support.scripted import outbox_rows, start
from tests.test_direct import _database, _subscriber
from tests.test_outbox import scripted

A, B, C = "INSERT INTO a (x) VALUES ($1)", "UPDATE b SET y = $1 WHERE id = $2", "SELECT $1"
TABLES = {A: frozenset({"a"}), B: frozenset({"b"}), C: frozenset()}


def test_writes_on_disjoint_tables_ride_in_one_statement_numbered_on() -> None:
    merged = pg_driver.merge_writes([(A, [(1,)], False), (B, [(2, 3)], False),
                                     (C, [(4,)], True)], TABLES)
    assert merged == [(f"WITH w0 AS ({A}), w1 AS (UPDATE b SET y = $2 WHERE id = $3) "
                       "SELECT $4", [(1, 2, 3, 4)], True)]


def test_a_table_named_again_a_many_row_or_an_unknown_statement_starts_anew() -> None:
    again = pg_driver.merge_writes([(A, [(1,)], False), (A, [(2,)], False)], TABLES)
    assert again == [(A, [(1,)], False), (A, [(2,)], False)]  # in order, one by one
    many = pg_driver.merge_writes([(A, [(1,), (2,)], False), (C, [(3,)], True)], TABLES)
    assert many == [(A, [(1,), (2,)], False), (C, [(3,)], True)]
    unknown = pg_driver.merge_writes([(A, [(1,)], False), ("NOTIFY x", [()], False)], TABLES)
    assert unknown == [(A, [(1,)], False), ("NOTIFY x", [()], False)]


@pytest.mark.postgres
async def test_merged_writes_on_postgresql_do_what_they_did_one_by_one(postgres_url) -> None:
    db = await _database(postgres_url)
    try:
        sid = await _subscriber(db)
        async with db.session() as session:
            connection = await direct(session)
            connection.defer = True
            await connection.write(UPDATE_SUBSCRIBER, {"b_id": sid, "first_name": "Ann"})
            await connection.write(UPDATE_SUBSCRIBER, {"b_id": sid, "last_name": "Lee"})
            found = (await connection.execute(
                select(Message.__table__.c.id).where(Message.__table__.c.id < 0), {})).rows
            assert found == []
        async with db.session() as session:
            assert (await session.execute(text(
                "SELECT first_name, last_name FROM subscribers"))).one() == ("Ann", "Lee")
    finally:
        await db.close()


@pytest.mark.postgres
async def test_a_take_over_on_postgresql_is_all_or_nothing(make_platform, postgres_url) -> None:
    platform = await scripted(make_platform, postgres_url)
    wakes: list[int] = []
    platform.outbox.on_commit = lambda: wakes.append(1)
    await platform.engine.handle(start(), hold=timedelta(seconds=5))
    await platform.engine.handle(start("u2", "e2"), hold=timedelta(seconds=5))
    rows = await outbox_rows(platform)
    first = [row.id for row in rows if row.recipient == "u1"]
    assert await platform.outbox.take_over(first) and wakes
    platform.clock.advance(timedelta(seconds=6))
    worker = OutboxClaims(platform.db, platform.clock, platform.settings.worker, "w")
    await worker.claim(
        and_(worker.claimable(platform.clock.now()), Outbox.recipient == "u2"), 10)
    assert not await platform.outbox.take_over([row.id for row in rows])
    after = {row.recipient: row.status for row in await outbox_rows(platform)}
    assert after == {"u1": OutboxStatus.SENT, "u2": OutboxStatus.SENDING}
    async with platform.db.session() as session:
        statuses = dict((await session.execute(select(Outbox.recipient, Message.status).join(
            Message, Message.id == Outbox.message_id))).all())
    assert statuses == {"u1": MessageStatus.SENT, "u2": MessageStatus.QUEUED}


async def _kill_connections(url: str) -> None:
    admin = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE datname = current_database() AND pid <> pg_backend_pid()")
    finally:
        await admin.close()


@pytest.mark.postgres
async def test_connections_killed_in_the_pool_fail_one_unit_then_are_replaced(
        postgres_url) -> None:
    db = Database(postgres_url)
    try:
        await db.ping()
        await _kill_connections(postgres_url)
        failed = 0
        for _ in range(3):
            try:
                await db.ping()
            except StorageUnavailable:
                failed += 1
        assert failed <= 1  # the failure invalidates the pool: the next one reconnects
    finally:
        await db.close()


@pytest.mark.postgres
async def test_a_connection_that_lay_idle_is_pinged_and_replaced_silently(
        postgres_url, monkeypatch) -> None:
    db = Database(postgres_url)
    try:
        await db.ping()
        monkeypatch.setattr(pg_driver, "PING_IDLE_AFTER", 0.0)
        await _kill_connections(postgres_url)
        await db.ping()  # the ping found it dead: a new connection, no error
    finally:
        await db.close()


def test_an_interactive_wake_up_wakes_only_the_interactive_delivery() -> None:
    """A turn's NOTIFY says its rows are interactive: the scheduler and the broadcasts'
    pipeline of every worker do not each run a claim that finds nothing."""
    every_turn_mine = SimpleNamespace(outbox=SimpleNamespace(named=lambda ids: True))
    worker = Worker(scheduler=None, delivery=every_turn_mine,  # type: ignore[arg-type]
                    poll_interval=1.0)
    worker.notify(INTERACTIVE)
    assert [wake.is_set() for wake in (worker.wake, *worker.delivery_wakes)] == [
        False, True, False]
    worker.notify()
    assert all(wake.is_set() for wake in (worker.wake, *worker.delivery_wakes))


@pytest.mark.postgres
async def test_listen_hands_on_what_a_notify_says(postgres_url) -> None:
    heard: list[str] = []
    stop = asyncio.Event()
    listening = asyncio.create_task(listen(postgres_url, WORK_CHANNEL, heard.append, stop))
    db = Database(postgres_url)
    try:
        await wait_for(lambda: _true(heard == [""]), what="the listener to connect")
        async with db.session() as session:
            await notify_workers(session, INTERACTIVE)
        await wait_for(lambda: _true(heard == ["", INTERACTIVE]), what="the NOTIFY")
    finally:
        stop.set()
        await listening
        await db.close()


async def _true(value: bool) -> bool:
    return value


@pytest.mark.postgres
async def test_listeners_share_out_a_turns_rows_and_take_all_alone(postgres_url) -> None:
    """Each of two listening workers learns its place among them; a turn's NOTIFY (its
    rows) is then one worker's to claim, and a NOTIFY naming nothing everyone's."""
    from bot_platform.config import WorkerSettings

    shares: list[list[tuple[int, int]]] = [[], []]
    stop = asyncio.Event()
    listening = [asyncio.create_task(listen(
        postgres_url, WORK_CHANNEL, lambda _: None, stop,
        on_share=lambda index, count, seen=seen: seen.append((index, count))))
        for seen in shares]
    db = Database(postgres_url)
    try:
        await wait_for(lambda: _true(all(s and s[-1][1] == 2 for s in shares)),
                       what="both listeners to see each other")
        assert sorted(s[-1] for s in shares) == [(0, 2), (1, 2)]
        claims = [OutboxClaims(db, None, WorkerSettings(), f"w{n}") for n in (0, 1)]
        for claim, share in zip(claims, shares, strict=True):
            claim.share = share[-1]
        for first in (10, 11):
            assert sorted(c.named([first, first + 5]) for c in claims) == [False, True]
        assert all(c.named(None) for c in claims)
    finally:
        stop.set()
        await asyncio.gather(*listening)
        await db.close()
    assert all(s[-1] == (0, 1) for s in shares)  # not listening: all of it theirs again

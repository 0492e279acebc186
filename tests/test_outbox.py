"""The outbox as the one owner of its rows: claims by many workers at once, releases,
the webhook's take-over, and the leased queue the scheduler shares with it."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import datetime, timedelta

import pytest
from sqlalchemy import and_, insert, select

from bot_platform.config import BotConfig
from bot_platform.models import Contact, Job, Outbox, Subscriber
from bot_platform.outbox_claims import ClaimedRow, OutboxClaims
from bot_platform.statuses import OutboxStatus, SubscriberStatus
from bot_platform.types import Outgoing
from tests.support.scripted import ScriptedChannel, outbox_rows, start

PEOPLE = 120


def naive(moment: datetime) -> datetime:
    """Times are stored as naive UTC."""
    return moment.replace(tzinfo=None)


async def scripted(make_platform, database_url: str | None = None):
    channel = ScriptedChannel()
    return await make_platform(bots=[BotConfig(id="b1", channel="scripted")],
                               channel_overrides={("scripted", "b1"): channel},
                               database_url=database_url)


async def queue_for_everyone(platform, people: int, per_person: int) -> None:
    now = platform.clock.now()
    async with platform.db.session() as session:
        await session.execute(insert(Contact), [{"created_at": now}] * people)
        contacts = (await session.scalars(select(Contact.id).order_by(Contact.id))).all()
        await session.execute(insert(Subscriber), [
            {"contact_id": contact, "channel": "scripted", "bot_id": "b1",
             "user_id": f"u{n}", "status": SubscriberStatus.SUBSCRIBED, "locale": "en",
             "attributes": {}, "last_inbound_at": now, "created_at": now, "updated_at": now}
            for n, contact in enumerate(contacts)])
        subscribers = (await session.scalars(select(Subscriber))).all()
        await platform.outbox.enqueue_many(session, [
            (s, [(None, Outgoing(text=f"{s.user_id}:{n}")) for n in range(per_person)])
            for s in subscribers])


@pytest.mark.postgres
async def test_concurrent_claims_never_give_a_row_to_two_workers(make_platform,
                                                                  postgres_url) -> None:
    """Six workers claim side by side until nothing is left: every subscriber's first
    row is claimed exactly once, by the worker whose id the row carries, and no later
    row of a subscriber is claimed while the first is unsent."""
    platform = await scripted(make_platform, postgres_url)
    await queue_for_everyone(platform, PEOPLE, per_person=2)
    claimers = [OutboxClaims(platform.db, platform.clock, platform.settings.worker,
                             f"worker-{n}") for n in range(6)]
    claimed: dict[str, list[ClaimedRow]] = {c.worker_id: [] for c in claimers}

    async def claim_until_empty(claims: OutboxClaims) -> None:
        while True:
            rows, _ = await claims.claim_batch(7)
            if not rows:
                return
            claimed[claims.worker_id].extend(rows)
            await asyncio.sleep(0)

    await asyncio.gather(*(claim_until_empty(c) for c in claimers))
    every = Counter(row.id for rows in claimed.values() for row in rows)
    assert set(every.values()) == {1}
    assert len(every) == PEOPLE
    assert Counter(row.subscriber_id for rows in claimed.values() for row in rows) \
        == Counter({s: 1 for s in {row.subscriber_id for rows in claimed.values()
                                   for row in rows}})
    stored = {row.id: row for row in await outbox_rows(platform)}
    first = {}
    for row in sorted(stored.values(), key=lambda r: r.id):
        first.setdefault(row.subscriber_id, row.id)
    assert set(every) == set(first.values())
    for worker_id, rows in claimed.items():
        for row in rows:
            assert (stored[row.id].status, stored[row.id].locked_by) == (
                OutboxStatus.SENDING, worker_id)
            assert claimers[int(worker_id[-1])].leases.owns(row.id)


async def test_a_release_hands_over_only_rows_still_pending(make_platform) -> None:
    """Messages held for a webhook answer are released at once, but a row a worker has
    claimed meanwhile (its hold expired) keeps its lease, and a sent one stays sent."""
    platform = await scripted(make_platform)
    handled = await platform.engine.handle(start(), hold=timedelta(seconds=5))
    await platform.engine.handle(start("u2", "e2"), hold=timedelta(seconds=5))
    await platform.engine.handle(start("u3", "e3"), hold=timedelta(seconds=5))
    rows = await outbox_rows(platform)
    by_user = {row.recipient: row for row in rows}
    assert await platform.outbox.take_over([by_user["u3"].id])
    platform.clock.advance(timedelta(seconds=6))  # the hold ran out: a worker claims u2
    worker = OutboxClaims(platform.db, platform.clock, platform.settings.worker, "w")
    claimed, _ = await worker.claim(
        and_(worker.claimable(platform.clock.now()), Outbox.recipient == "u2"), 10)
    assert [row.recipient for row in claimed] == ["u2"]
    platform.clock.advance(timedelta(seconds=1))
    await platform.outbox.release([row.id for row in rows])
    after = {row.recipient: row for row in await outbox_rows(platform)}
    assert (after["u1"].status, naive(after["u1"].next_attempt_at)) == (
        OutboxStatus.PENDING, naive(platform.clock.now()))
    assert (after["u2"].status, after["u2"].locked_by, after["u2"].next_attempt_at) == (
        OutboxStatus.SENDING, "w", by_user["u2"].next_attempt_at)
    assert (after["u3"].status, after["u3"].next_attempt_at) == (
        OutboxStatus.SENT, by_user["u3"].next_attempt_at)
    assert handled.outbox_ids == (by_user["u1"].id,)


async def test_a_take_over_is_all_or_nothing(make_platform) -> None:
    """A webhook answer carries its rows only if no worker took any of them: otherwise
    nothing is marked sent, and the worker sends them all."""
    platform = await scripted(make_platform)
    await platform.engine.handle(start(), hold=timedelta(seconds=5))
    await platform.engine.handle(start("u2", "e2"), hold=timedelta(seconds=5))
    rows = await outbox_rows(platform)
    platform.clock.advance(timedelta(seconds=6))
    worker = OutboxClaims(platform.db, platform.clock, platform.settings.worker, "w")
    await worker.claim(
        and_(worker.claimable(platform.clock.now()), Outbox.recipient == "u2"), 10)
    assert not await platform.outbox.take_over([row.id for row in rows])
    assert [row.status for row in await outbox_rows(platform)] == [
        OutboxStatus.PENDING, OutboxStatus.SENDING]


async def test_jobs_share_the_outbox_lease_deadlines(make_platform) -> None:
    """The scheduler claims through the same leased queue: a claimed job is surely ours
    until its lease (minus the margin) passes on the boot clock."""
    platform = await scripted(make_platform)
    now = platform.clock.now()
    async with platform.db.session() as session:
        session.add(Job(kind="nothing", due_at=now, created_at=now, payload={}))
    scheduler = platform.worker.scheduler
    ticks = [1000.0]
    scheduler.leases.monotonic = lambda: ticks[0]
    [(job_id, _, _)] = [c for c in await scheduler.claim(10) if c[1] == "nothing"]
    assert scheduler.leases.owns(job_id)
    ticks[0] += platform.settings.worker.lease_seconds
    assert not scheduler.leases.owns(job_id)
    assert await scheduler.renew_leases() >= 1
    assert scheduler.leases.owns(job_id)


async def test_interactive_claims_take_heads_of_ready_interactive_rows_only(
        make_platform) -> None:
    """The interactive claim starts from ready interactive rows (in due order) and takes
    their subscribers' oldest rows: an earlier broadcast row that holds one up goes with
    it, a row not yet due and a broadcast-only subscriber wait; the bulk claim then
    takes only the broadcast subscriber's oldest row."""
    platform = await scripted(make_platform)
    await queue_for_everyone(platform, 4, per_person=2)
    rows = await outbox_rows(platform)
    by_user: dict[str, list[int]] = {}
    for row in sorted(rows, key=lambda row: row.id):
        by_user.setdefault(row.recipient, []).append(row.id)
    later = platform.clock.now() + timedelta(minutes=5)
    async with platform.db.session() as session:
        await session.execute(Outbox.__table__.update().where(
            Outbox.id.in_([by_user["u0"][0], *by_user["u2"]])).values(broadcast_id=7))
        await session.execute(Outbox.__table__.update().where(
            Outbox.id.in_(by_user["u1"])).values(next_attempt_at=later))
        await session.execute(Outbox.__table__.delete().where(
            Outbox.id == by_user["u3"][1]))
    worker = OutboxClaims(platform.db, platform.clock, platform.settings.worker, "w")
    claimed, _ = await worker.claim_batch(10, "interactive")
    assert sorted(row.id for row in claimed) == [by_user["u0"][0], by_user["u3"][0]]
    assert all(row.urgent for row in claimed)
    bulk, _ = await worker.claim_batch(10, "bulk")
    assert [row.id for row in bulk] == [by_user["u2"][0]]
    assert not (await worker.claim_batch(10, "interactive"))[0]

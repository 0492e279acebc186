"""The outbox as the one owner of its rows: claims by many workers at once, releases,
the webhook's take-over, and the leased queue the scheduler shares with it."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import and_, insert, select

from bot_platform.config import BotConfig
from bot_platform.models import Contact, Job, Outbox, Subscriber
from bot_platform.outbox_claims import OutboxClaims
from bot_platform.outbox_results import ClaimedRow
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
    by_user = await row_ids_by_user(platform)
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


async def named_rows_worker(platform: Any) -> OutboxClaims:
    """A worker whose heads query runs once (finding nothing) and, its poll interval one
    no test run reaches, again only when told: its claims take the rows it is named."""
    from bot_platform.config import WorkerSettings

    worker = OutboxClaims(platform.db, platform.clock, WorkerSettings(poll_interval=3600),
                          "w")
    assert not (await worker.claim_batch(10, "interactive"))[0]  # the heads query: none
    return worker


async def row_ids_by_user(platform: Any) -> dict[str, list[int]]:
    """Each recipient's outbox row ids, oldest first."""
    by_user: dict[str, list[int]] = {}
    for row in sorted(await outbox_rows(platform), key=lambda row: row.id):
        by_user.setdefault(row.recipient, []).append(row.id)
    return by_user


@pytest.mark.postgres
async def test_postgres_claims_the_rows_a_notify_names_by_id(make_platform,
                                                             postgres_url) -> None:
    """A turn's NOTIFY names its rows: the next interactive claim takes those by id (a
    named row behind its subscriber's earlier one waits, and the claim says more wait),
    not other ready rows; a NOTIFY naming nothing brings the heads query back (as do a
    claim with nothing named and a poll interval without it)."""
    platform = await scripted(make_platform, postgres_url)
    worker = await named_rows_worker(platform)
    await queue_for_everyone(platform, 2, per_person=2)
    by_user = await row_ids_by_user(platform)
    worker.named(by_user["u0"])
    claimed, more = await worker.claim_batch(10, "interactive")
    assert [row.id for row in claimed] == [by_user["u0"][0]]
    assert more == {claimed[0].subscriber_id}
    worker.named([by_user["u0"][1]])
    worker.named(None)  # and one naming nothing: the heads query finds u1's row
    claimed, _ = await worker.claim_batch(10, "interactive")
    assert [row.id for row in claimed] == [by_user["u1"][0]]


@pytest.mark.postgres
async def test_postgres_claims_any_number_of_named_rows(make_platform, postgres_url) -> None:
    """Named rows are claimed the same whether they go as one to four parameters or as
    an array (more than four): each subscriber's oldest row, never a row behind it, and
    a row claimed already is not claimed again."""
    platform = await scripted(make_platform, postgres_url)
    worker = await named_rows_worker(platform)
    await queue_for_everyone(platform, 15, per_person=2)
    by_user = await row_ids_by_user(platform)
    users = iter(sorted(by_user, key=lambda user: by_user[user][0]))
    for count in (1, 2, 3, 4, 5):
        chosen = [next(users) for _ in range(count)]
        for user in chosen:  # each one's rows, as its turn's NOTIFY names them
            worker.named(by_user[user])
        claimed, more = await worker.claim_batch(10, "interactive")
        assert sorted(row.id for row in claimed) == sorted(by_user[u][0] for u in chosen)
        assert more == {row.subscriber_id for row in claimed}
        worker.named([by_user[user][0] for user in chosen])  # already claimed
        assert not (await worker.claim_batch(10, "interactive"))[0]


@pytest.mark.postgres
async def test_postgres_bulk_claim_takes_ready_first_rows_in_id_order(postgres_url: str) -> None:
    """PostgreSQL's bulk claim (``ix_outbox_bulk_unsent``, sorting off): broadcasts' rows
    in id order, past sent ones; a row with an earlier unsent row of its subscriber, one
    in another worker's live lease and one not yet due wait; one whose lease expired is
    taken over; two workers take disjoint rows."""
    from bot_platform.clock import ManualClock
    from bot_platform.config import WorkerSettings
    from bot_platform.database import Database
    from bot_platform.migrations import upgrade
    from bot_platform.models import Message

    await asyncio.to_thread(upgrade, postgres_url)
    db = Database(postgres_url)
    clock = ManualClock()
    now = clock.now()
    past, future = now - timedelta(minutes=1), now + timedelta(minutes=5)
    # (subscriber, broadcast, status, due, lease): the outbox rows in id order
    plan = [(1, 7, "sent", past, None), (1, 7, "pending", past, None),
            (2, None, "pending", future, None), (2, 7, "pending", past, None),
            (3, 7, "sending", past, past), (4, 7, "sending", past, future),
            (5, 7, "pending", future, None), (6, 7, "pending", past, None)]
    try:
        async with db.session() as session:
            await session.execute(insert(Contact), [{"created_at": now}] * 6)
            contacts = (await session.scalars(select(Contact.id).order_by(Contact.id))).all()
            await session.execute(insert(Subscriber), [
                {"id": n, "contact_id": contacts[n - 1], "channel": "telegram",
                 "bot_id": "tg", "user_id": str(n), "status": "subscribed", "locale": "en",
                 "attributes": {}, "created_at": now, "updated_at": now}
                for n in range(1, 7)])
            ids = []
            for subscriber, broadcast, status, due, lease in plan:
                message = await session.scalar(insert(Message).values(
                    subscriber_id=subscriber, channel="telegram", direction="out",
                    kind="text", status="queued", created_at=now, updated_at=now
                ).returning(Message.id))
                ids.append(await session.scalar(insert(Outbox).values(
                    subscriber_id=subscriber, message_id=message, channel="telegram",
                    bot_id="tg", recipient=str(subscriber), payload={"text": "hi"},
                    status=status, attempts=0, next_attempt_at=due, broadcast_id=broadcast,
                    locked_by="other" if lease else None, lease_expires_at=lease,
                    created_at=now).returning(Outbox.id)))
        settings = WorkerSettings()
        first = OutboxClaims(db, clock, settings, "a")
        second = OutboxClaims(db, clock, settings, "b")
        claimed, _ = await first.claim_batch(2, "bulk")
        assert [row.id for row in claimed] == [ids[1], ids[4]]
        claimed, _ = await second.claim_batch(10, "bulk")
        assert [row.id for row in claimed] == [ids[7]]
        assert not (await first.claim_batch(10, "bulk"))[0]
        async with db.session() as session:
            holders = dict((await session.execute(select(Outbox.id, Outbox.locked_by).where(
                Outbox.status == OutboxStatus.SENDING))).all())
        assert holders == {ids[1]: "a", ids[4]: "a", ids[5]: "other", ids[7]: "b"}
    finally:
        await db.close()

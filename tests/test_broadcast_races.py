"""Broadcast lifecycle races, on SQLite and PostgreSQL: concurrent starts, pause/resume
storms while several job executors run, a cancel in the middle of a batch, and a row given
back by a delivery worker after a cancel. Counted per recipient: everyone gets exactly one
outbox row, and nothing is created or left pending after a cancel."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, insert, select, update

from bot_platform import broadcasts
from bot_platform.apikeys import create_key
from bot_platform.config import BotConfig
from bot_platform.jobs import Scheduler
from bot_platform.models import BroadcastRecipient, Contact, Job, Outbox, Subscriber
from tests.support.scripted import ScriptedChannel, another_worker

PEOPLE = 600


@pytest.fixture
async def audience(make_platform, db_url, monkeypatch) -> Any:
    """600 subscribers on a scripted bot, a marketer's client, and small batches (so a
    broadcast is many send jobs)."""
    monkeypatch.setattr(broadcasts, "BATCH", 50)
    channel = ScriptedChannel()
    platform = await make_platform(database_url=db_url,
                                   bots=[BotConfig(id="b1", channel="scripted")],
                                   channel_overrides={("scripted", "b1"): channel})
    now = platform.clock.now()
    async with platform.db.session() as session:
        await session.execute(insert(Contact), [{"created_at": now}] * PEOPLE)
        contacts = (await session.scalars(select(Contact.id).order_by(Contact.id))).all()
        await session.execute(insert(Subscriber), [{
            "contact_id": contact, "channel": "scripted", "bot_id": "b1", "user_id": f"u{n}",
            "status": "subscribed", "locale": "en", "attributes": {}, "created_at": now,
            "updated_at": now} for n, contact in enumerate(contacts)])
    _, key = await create_key(platform.db, name="m", role="marketer", now=now)
    client = platform.http_client()
    client.headers["Authorization"] = f"Bearer {key}"
    yield platform, client, channel
    await client.aclose()


async def create(client) -> int:
    response = await client.post("/api/broadcasts", json={
        "name": "spring", "filter": {"channel": "scripted"},
        "variants": [{"name": "A", "percent": 100,
                      "messages": {"en": {"text": "Spring sale: 20% off"}}}]})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def executor(platform, name: str) -> Scheduler:
    """Another process's scheduler on the same database."""
    scheduler = Scheduler(platform.db, platform.engine, platform.clock,
                          platform.settings.worker, name)
    scheduler.handlers = dict(platform.worker.scheduler.handlers)
    return scheduler


async def run_jobs(platform, stop: asyncio.Event | None = None, executors: int = 3) -> None:
    """Several executors claiming and running jobs side by side until ``stop`` is set (or,
    without it, until none finds a job)."""
    async def loop(scheduler: Scheduler) -> None:
        while True:
            if await scheduler.run_once() == 0:
                if stop is None or stop.is_set():
                    return
                await asyncio.sleep(0.005)

    await asyncio.gather(*(loop(executor(platform, f"executor-{n}"))
                           for n in range(executors)))


async def rows_per_recipient(platform, broadcast_id: int) -> Counter[int]:
    async with platform.db.session() as session:
        return Counter(dict((await session.execute(select(
            Outbox.subscriber_id, func.count()).where(Outbox.broadcast_id == broadcast_id)
            .group_by(Outbox.subscriber_id))).all()))


def sends_per_user(channel: ScriptedChannel) -> Counter[str]:
    return Counter(recipient for recipient, _, status in channel.calls if status == "sent")


async def test_concurrent_starts_one_wins_and_everyone_gets_one_row(audience) -> None:
    platform, client, channel = audience
    broadcast_id = await create(client)
    answers = await asyncio.gather(*(client.post(f"/api/broadcasts/{broadcast_id}/start")
                                     for _ in range(8)))
    codes = Counter(a.status_code for a in answers)
    assert codes == {200: 1, 409: 7}, [a.text for a in answers]
    assert all(a.json()["detail"] == "a running broadcast cannot start"
               for a in answers if a.status_code == 409)
    await run_jobs(platform)
    await platform.drain()
    per_recipient = await rows_per_recipient(platform, broadcast_id)
    assert len(per_recipient) == PEOPLE and set(per_recipient.values()) == {1}
    sent = sends_per_user(channel)
    assert len(sent) == PEOPLE and set(sent.values()) == {1}
    figures = (await client.get(f"/api/broadcasts/{broadcast_id}")).json()
    assert figures["status"] == "completed"
    assert (figures["stats"]["A"]["queued"], figures["stats"]["A"]["sent"]) == (PEOPLE, PEOPLE)


async def test_pause_resume_storm_while_executors_run_queues_everyone_once(audience) -> None:
    platform, client, channel = audience
    broadcast_id = await create(client)
    assert (await client.post(f"/api/broadcasts/{broadcast_id}/start")).status_code == 200
    stop = asyncio.Event()

    async def storm() -> list[int]:
        codes = []
        for _ in range(6):
            # Two at once each time: one wins, the other finds it already changed.
            for action in ("pause", "resume"):
                pair = await asyncio.gather(*(
                    client.post(f"/api/broadcasts/{broadcast_id}/{action}")
                    for _ in range(2)))
                codes.append(sorted(a.status_code for a in pair))
                await asyncio.sleep(0.01)  # let the executors take a batch in between
        stop.set()
        return codes

    codes, _ = await asyncio.gather(storm(), run_jobs(platform, stop))
    async with platform.db.session() as session:
        alive = await session.scalar(select(func.count()).select_from(Job).where(
            Job.kind == broadcasts.SEND_KIND, Job.status.in_(("pending", "running"))))
    await run_jobs(platform)
    await platform.drain()
    per_recipient = await rows_per_recipient(platform, broadcast_id)
    assert len(per_recipient) == PEOPLE and set(per_recipient.values()) == {1}
    assert codes == [[200, 409]] * 12
    assert alive <= 1  # one job chain, however many resumes
    sent = sends_per_user(channel)
    assert len(sent) == PEOPLE and set(sent.values()) == {1}
    assert (await client.get(f"/api/broadcasts/{broadcast_id}")).json()[
        "status"] == "completed"


async def test_a_cancel_during_a_batch_leaves_nothing_created_or_pending(
        audience, monkeypatch) -> None:
    platform, client, channel = audience
    broadcast_id = await create(client)
    mid_batch, cancelled = asyncio.Event(), asyncio.Event()
    batches: list[int] = []
    enqueue_many = platform.outbox.enqueue_many

    async def slow_enqueue(*args: Any, **kwargs: Any) -> Any:
        """The third batch's rows are written, then the batch lingers until the cancel has
        answered (or a moment passes: a cancel that waits for the batch cannot answer)."""
        queued = await enqueue_many(*args, **kwargs)
        batches.append(len(queued))
        if len(batches) == 3:
            mid_batch.set()
            try:
                await asyncio.wait_for(cancelled.wait(), timeout=1.0)
            except TimeoutError:
                pass
        return queued

    monkeypatch.setattr(platform.outbox, "enqueue_many", slow_enqueue)
    stop = asyncio.Event()
    snapshot: dict[str, Any] = {}

    async def deliver() -> None:
        worker = another_worker(platform)
        while not stop.is_set():
            if await worker.run_once() == 0:
                await asyncio.sleep(0.005)

    async def cancel_mid_batch() -> None:
        await mid_batch.wait()
        answers = await asyncio.gather(*(client.post(f"/api/broadcasts/{broadcast_id}/cancel")
                                         for _ in range(3)))
        cancelled.set()
        assert sorted(a.status_code for a in answers) == [200, 409, 409]
        assert {a.json().get("status") for a in answers} == {"cancelled", None}
        async with platform.db.sessions() as session:
            snapshot["rows"] = dict((await session.execute(select(
                Outbox.id, Outbox.status).where(Outbox.broadcast_id == broadcast_id))).all())
        stop.set()

    assert (await client.post(f"/api/broadcasts/{broadcast_id}/start")).status_code == 200
    await asyncio.gather(cancel_mid_batch(), run_jobs(platform, stop), deliver())
    await run_jobs(platform)
    await platform.drain()

    at_cancel = snapshot["rows"]
    assert len(at_cancel) >= 100
    assert not {"pending", "held"} & set(at_cancel.values())
    async with platform.db.session() as session:
        now = dict((await session.execute(select(Outbox.id, Outbox.status).where(
            Outbox.broadcast_id == broadcast_id))).all())
        recipients = Counter((await session.scalars(select(BroadcastRecipient.status).where(
            BroadcastRecipient.broadcast_id == broadcast_id))).all())
    assert set(now) == set(at_cancel)  # no row created after the cancel answered
    handed_over = {i for i, status in at_cancel.items() if status in ("sending", "sent")}
    assert {i for i, status in now.items() if status == "sent"} <= handed_over
    assert set(now.values()) <= {"sent", "skipped"}
    assert recipients["pending"] == 0 and recipients["skipped"] > 0
    assert recipients["queued"] == len(now)
    assert sum(sends_per_user(channel).values()) == len(handed_over)
    figures = (await client.get(f"/api/broadcasts/{broadcast_id}")).json()
    assert figures["status"] == "cancelled"
    stats = figures["stats"]["A"]
    assert stats["targeted"] == PEOPLE
    assert stats["sent"] + stats["skipped"]["cancelled"] == PEOPLE


async def test_a_row_given_back_after_a_cancel_is_skipped(audience) -> None:
    """A delivery worker holds a row (claimed before the cancel), then gives it back
    because its rate-limit slot is far off: it must not be sent later."""
    platform, client, channel = audience
    broadcast_id = await create(client)
    await client.post(f"/api/broadcasts/{broadcast_id}/start")
    await run_jobs(platform)
    worker = another_worker(platform)
    rows, _ = await worker.claim_batch(10)
    assert len(rows) == 10
    assert (await client.post(f"/api/broadcasts/{broadcast_id}/cancel")).status_code == 200
    for row in rows:
        await worker.release(row, delay=30)
    await platform.drain()
    async with platform.db.session() as session:
        statuses = Counter((await session.scalars(select(Outbox.status).where(
            Outbox.broadcast_id == broadcast_id))).all())
    assert statuses == {"skipped": PEOPLE}
    assert channel.calls == []


async def test_a_row_given_back_while_paused_waits_for_the_resume(audience) -> None:
    platform, client, channel = audience
    broadcast_id = await create(client)
    await client.post(f"/api/broadcasts/{broadcast_id}/start")
    await run_jobs(platform)
    worker = another_worker(platform)
    rows, _ = await worker.claim_batch(10)
    assert (await client.post(f"/api/broadcasts/{broadcast_id}/pause")).status_code == 200
    for row in rows:
        await worker.release(row, delay=0)
    await platform.drain()
    assert channel.calls == []
    assert (await client.post(f"/api/broadcasts/{broadcast_id}/resume")).status_code == 200
    await platform.drain()
    sent = sends_per_user(channel)
    assert len(sent) == PEOPLE and set(sent.values()) == {1}


async def test_a_scheduled_broadcast_does_not_start_twice(audience) -> None:
    platform, client, channel = audience
    later = (platform.clock.now() + timedelta(hours=1)).isoformat()
    response = await client.post("/api/broadcasts", json={
        "name": "later", "filter": {"channel": "scripted"}, "scheduled_at": later,
        "variants": [{"name": "A", "percent": 100, "messages": {"en": {"text": "Hi"}}}]})
    broadcast_id = response.json()["id"]
    answers = await asyncio.gather(*(client.post(f"/api/broadcasts/{broadcast_id}/start")
                                     for _ in range(4)))
    assert sorted(a.status_code for a in answers) == [200, 409, 409, 409]
    again = await client.post(f"/api/broadcasts/{broadcast_id}/start")
    assert again.status_code == 409
    assert again.json()["detail"] == "a scheduled broadcast cannot start"
    await run_jobs(platform)
    await platform.drain()
    assert channel.calls == []  # nothing before its moment
    platform.clock.advance(timedelta(hours=1))
    await run_jobs(platform)
    await platform.drain()
    sent = sends_per_user(channel)
    assert len(sent) == PEOPLE and set(sent.values()) == {1}


async def test_a_broadcast_whose_send_job_gave_up_resumes_once(audience) -> None:
    """A send job that failed for good leaves the broadcast running with recipients
    pending; pause and resume start one new job, which queues only those."""
    platform, client, channel = audience
    broadcast_id = await create(client)
    await client.post(f"/api/broadcasts/{broadcast_id}/start")
    await executor(platform, "first").run_once()  # one batch of 50 queued
    async with platform.db.session() as session:
        await session.execute(update(Job).where(
            Job.kind == broadcasts.SEND_KIND, Job.status == "pending").values(
            status="failed", last_error="gave up after 5 attempts"))
    await run_jobs(platform)
    assert (await client.get(f"/api/broadcasts/{broadcast_id}")).json()["status"] == "running"
    assert (await client.post(f"/api/broadcasts/{broadcast_id}/pause")).status_code == 200
    assert (await client.post(f"/api/broadcasts/{broadcast_id}/resume")).status_code == 200
    await run_jobs(platform)
    await platform.drain()
    per_recipient = await rows_per_recipient(platform, broadcast_id)
    assert len(per_recipient) == PEOPLE and set(per_recipient.values()) == {1}
    sent = sends_per_user(channel)
    assert len(sent) == PEOPLE and set(sent.values()) == {1}
    assert (await client.get(f"/api/broadcasts/{broadcast_id}")).json()[
        "status"] == "completed"

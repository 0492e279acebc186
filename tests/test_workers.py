"""Several workers sharing one queue: every message and timer handled exactly once, in
order per subscriber (SKIP LOCKED on PostgreSQL, atomic UPDATE ... RETURNING on SQLite)."""

from __future__ import annotations

import asyncio
import math
from collections import defaultdict
from datetime import timedelta

from sqlalchemy import func, select

from bot_platform.config import BotConfig
from bot_platform.delivery import Delivery
from bot_platform.jobs import Scheduler
from bot_platform.models import Job, Outbox, Subscriber
from bot_platform.types import Capabilities, Inbound, InboundKind, Outgoing, SendResult


class SlowChannel:
    """Records sends; yields to the loop so workers interleave."""

    name = "slow"
    bot_id = "b1"
    capabilities = Capabilities(messages_per_second=math.inf, per_chat_per_second=math.inf)

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []

    async def parse(self, request):  # pragma: no cover - not used
        return []

    async def send(self, recipient: str, message: Outgoing) -> SendResult:
        await asyncio.sleep(0.001)
        self.sent.append((recipient, message.text))
        return SendResult.sent(str(len(self.sent)))


async def test_three_workers_deliver_each_message_once_in_order(make_platform, db_url) -> None:
    channel = SlowChannel()
    platform = await make_platform(bots=[BotConfig(id="b1", channel="slow")],
                                   database_url=db_url,
                                   channel_overrides={("slow", "b1"): channel})
    users = [f"u{n}" for n in range(60)]
    for user in users:
        await platform.engine.handle(Inbound(channel="slow", bot_id="b1", user_id=user,
                                             event_id=user, kind=InboundKind.START))
    async with platform.db.session() as session:
        for subscriber in (await session.scalars(select(Subscriber))).all():
            await platform.outbox.enqueue(session, subscriber, [
                (None, Outgoing(text=f"{subscriber.user_id}:{n}")) for n in range(3)])
    workers = [Delivery(platform.db, platform.channel, platform.bot, platform.limiter,
                        platform.clock, platform.settings.worker.model_copy(
                            update={"batch_size": 7}), f"worker-{n}") for n in range(3)]

    async def run(worker: Delivery) -> None:
        while await worker.run_once():
            pass

    await asyncio.gather(*(run(w) for w in workers))
    await asyncio.gather(*(run(w) for w in workers))
    per_user: dict[str, list[str]] = defaultdict(list)
    for recipient, text in channel.sent:
        per_user[recipient].append(text)
    assert len(channel.sent) == len(users) * 4
    for user in users:
        assert per_user[user][0].startswith("Hi there!")
        assert per_user[user][1:] == [f"{user}:{n}" for n in range(3)]
    async with platform.db.session() as session:
        statuses = (await session.execute(select(Outbox.status, func.count())
                                          .group_by(Outbox.status))).all()
        assert dict(statuses) == {"sent": len(users) * 4}


async def test_three_schedulers_fire_each_timer_once(make_platform, db_url) -> None:
    platform = await make_platform(database_url=db_url)
    console = platform.channel("console", "console")
    for n in range(40):
        await platform.engine.handle(console.inbound(f"u{n}", "/start"))
    platform.clock.advance(timedelta(days=1, seconds=1))
    schedulers = [Scheduler(platform.db, platform.engine, platform.clock,
                            platform.settings.worker.model_copy(update={"batch_size": 5}),
                            f"scheduler-{n}") for n in range(3)]

    async def run(scheduler: Scheduler) -> None:
        while await scheduler.run_once():
            pass

    await asyncio.gather(*(run(s) for s in schedulers))
    async with platform.db.session() as session:
        jobs = (await session.execute(select(Job.status, Job.result, func.count()).where(
            Job.kind == "flow_timer").group_by(Job.status, Job.result))).all()
        # 40 greeting timers fired once each; each scheduled the next (2 days later).
        assert sorted(jobs) == [("done", "fired", 40), ("pending", None, 40)]
    await platform.drain()
    tips = [user for user, m in console.sent if m.text.startswith("Tip of the day")]
    assert sorted(tips) == sorted(f"u{n}" for n in range(40))


async def test_enqueue_many_pairs_each_outbox_row_with_its_own_message(make_platform,
                                                                        db_url) -> None:
    """Bulk-queued rows get their ids from one multi-row INSERT each: every outbox row must
    still point at the message of the same subscriber, part and text."""
    from bot_platform.models import Message

    channel = SlowChannel()
    platform = await make_platform(bots=[BotConfig(id="b1", channel="slow")],
                                   database_url=db_url,
                                   channel_overrides={("slow", "b1"): channel})
    for n in range(40):
        await platform.engine.handle(Inbound(channel="slow", bot_id="b1", user_id=f"u{n}",
                                             event_id=f"e{n}", kind=InboundKind.START))
    async with platform.db.session() as session:
        subscribers = (await session.scalars(select(Subscriber).order_by(
            Subscriber.id.desc()))).all()
        queued = await platform.outbox.enqueue_many(session, [
            (s, [(None, Outgoing(text=f"{s.user_id}:{k}")) for k in range(n % 4)])
            for n, s in enumerate(subscribers)], broadcast_id=7)
    assert [len(q) for q in queued] == [n % 4 for n in range(40)]
    async with platform.db.session() as session:
        rows = (await session.execute(select(Outbox, Message).join(
            Message, Message.id == Outbox.message_id).where(Outbox.broadcast_id == 7))).all()
    assert len(rows) == sum(n % 4 for n in range(40))
    for outbox, message in rows:
        assert outbox.subscriber_id == message.subscriber_id
        assert outbox.payload["text"] == message.text
        assert message.text.startswith(f"{outbox.recipient}:")
    by_id = {outbox.id: outbox.payload["text"] for outbox, _ in rows}
    for (subscriber, _), ids in zip([(s, None) for s in subscribers], queued, strict=True):
        assert [by_id[i] for i, _ in ids] == [f"{subscriber.user_id}:{k}"
                                              for k in range(len(ids))]


async def test_a_job_that_ended_without_a_result_is_not_renewed_but_rerun(
        make_platform, monkeypatch) -> None:
    """A timer whose transaction and failure record both failed (the database went away)
    is left to expire and runs again, instead of being kept alive by the heartbeat."""
    platform = await make_platform()
    console = platform.channel("console", "console")
    await platform.engine.handle(console.inbound("u1", "/start"))
    platform.clock.advance(timedelta(days=1, seconds=1))
    scheduler = platform.worker.scheduler
    original = scheduler.handlers["flow_timer"]

    async def database_away(*args) -> str:
        raise ConnectionError("the database is away")

    async def cannot_record(job_id: int, error: Exception) -> None:
        raise ConnectionError("the database is still away")

    scheduler.handlers["flow_timer"] = database_away
    monkeypatch.setattr(scheduler, "_failed", cannot_record)
    claimed = await scheduler.claim(10)
    assert [kind for _, kind, _ in claimed].count("flow_timer") == 1
    for job_id, kind, identity in claimed:
        try:
            await scheduler._run_one(job_id, kind, identity)
        except ConnectionError:
            pass
    assert await scheduler.renew_leases() == 0
    scheduler.handlers["flow_timer"] = original
    monkeypatch.undo()
    platform.clock.advance(timedelta(seconds=31))  # past the lease
    await platform.drain()
    tips = [m.text for user, m in console.sent if m.text.startswith("Tip of the day")]
    assert len(tips) == 1

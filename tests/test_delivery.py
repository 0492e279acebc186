"""The delivery worker: every SendResult kind, ordering, leases, rate limits."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select, update

from bot_platform.config import BotConfig
from bot_platform.models import Message, Outbox, Subscriber
from bot_platform.ratelimit import Limits, MemoryRateLimiter
from bot_platform.types import Outgoing, SendResult
from tests.support.scripted import ScriptedChannel, another_worker, outbox_rows, start


@pytest.fixture
def fake_time() -> list[float]:
    return [1000.0]


async def scripted_platform(make_platform, channel: ScriptedChannel, fake_time=None):
    limiter = MemoryRateLimiter(monotonic=lambda: fake_time[0]) if fake_time else None
    return await make_platform(
        bots=[BotConfig(id="b1", channel="scripted")], limiter=limiter,
        channel_overrides={("scripted", "b1"): channel})


async def test_transient_failures_back_off_then_give_up_with_the_reason(make_platform) -> None:
    channel = ScriptedChannel([SendResult.transient("502 bad gateway")] * 10)
    platform = await scripted_platform(make_platform, channel)
    await platform.engine.handle(start())
    for _ in range(platform.settings.worker.max_attempts):
        await platform.drain()
        platform.clock.advance(timedelta(hours=2))  # past any backoff
    [row] = await outbox_rows(platform)
    assert row.status == "failed"
    assert row.attempts == platform.settings.worker.max_attempts
    assert row.last_error == "gave up after 5 attempts: 502 bad gateway"
    assert len(channel.calls) == 5
    async with platform.db.session() as session:
        message = await session.get(Message, row.message_id)
        assert (message.status, message.error) == ("failed", row.last_error)


async def test_transient_then_success_sends_once(make_platform) -> None:
    channel = ScriptedChannel([SendResult.transient("timeout")])
    platform = await scripted_platform(make_platform, channel)
    await platform.engine.handle(start())
    await platform.drain()
    [row] = await outbox_rows(platform)
    assert (row.status, row.attempts, row.last_error) == ("pending", 1, "timeout")
    delay = (row.next_attempt_at - platform.clock.now()).total_seconds()
    assert 0 < delay <= platform.settings.worker.backoff_base
    await platform.drain()
    assert len(channel.calls) == 1  # not due yet
    platform.clock.advance(timedelta(seconds=delay))
    await platform.drain()
    [row] = await outbox_rows(platform)
    assert row.status == "sent"
    assert channel.delivered() == [("u1", "Hi there! ")]


async def test_retry_after_pauses_the_whole_bot(make_platform, fake_time) -> None:
    channel = ScriptedChannel([SendResult.retry(30)])
    platform = await scripted_platform(make_platform, channel, fake_time)
    await platform.engine.handle(start("u1", "e1"))
    await platform.drain()
    await platform.engine.handle(start("u2", "e2"))
    platform.clock.advance(timedelta(seconds=31))
    await platform.drain()
    # The limiter still holds the bot (its own clock has not moved): nothing was sent.
    assert [status for _, _, status in channel.calls] == ["retry_after"]
    rows = await outbox_rows(platform)
    assert [r.status for r in rows] == ["pending", "pending"]
    assert rows[0].attempts == 0  # a rate limit is not a failed attempt
    fake_time[0] += 31
    platform.clock.advance(timedelta(seconds=60))
    await platform.drain()
    assert sorted(channel.delivered()) == [("u1", "Hi there! "), ("u2", "Hi there! ")]


async def test_blocked_user_is_unsubscribed_and_skipped_afterwards(make_platform) -> None:
    channel = ScriptedChannel([SendResult.blocked("Forbidden: bot was blocked by the user")])
    platform = await scripted_platform(make_platform, channel)
    await platform.engine.handle(start())
    await platform.drain()
    async with platform.db.session() as session:
        subscriber = await session.scalar(select(Subscriber))
        assert subscriber.status == "unsubscribed"
    platform.clock.advance(timedelta(days=5))  # the welcome timers come due
    await platform.drain()
    assert len(channel.calls) == 1
    [row] = await outbox_rows(platform)
    assert (row.status, row.last_error) == (
        "failed", "blocked: Forbidden: bot was blocked by the user")


async def test_permanent_failure_is_stored_and_not_retried(make_platform) -> None:
    channel = ScriptedChannel([SendResult.failed("Bad Request: chat not found")])
    platform = await scripted_platform(make_platform, channel)
    await platform.engine.handle(start())
    await platform.drain()
    platform.clock.advance(timedelta(hours=1))
    await platform.drain()
    [row] = await outbox_rows(platform)
    assert (row.status, row.last_error) == ("failed", "failed: Bad Request: chat not found")
    assert len(channel.calls) == 1


async def test_outside_reply_window_skipped_unless_tagged(make_platform) -> None:
    channel = ScriptedChannel(reply_window=timedelta(hours=24))
    platform = await scripted_platform(make_platform, channel)
    await platform.engine.handle(start())
    await platform.drain()
    assert len(channel.calls) == 1  # inside the window
    platform.clock.advance(timedelta(hours=25))
    async with platform.db.session() as session:
        subscriber = await session.scalar(select(Subscriber))
        queued = await platform.outbox.enqueue(session, subscriber, [
            (None, Outgoing(text="promo")),
            (None, Outgoing(text="your order shipped", outside_window="POST_PURCHASE_UPDATE"))])
    await platform.drain()
    rows = {r.id: r for r in await outbox_rows(platform)}
    untagged, tagged = (rows[i] for i, _ in queued)
    assert untagged.status == "skipped"
    assert untagged.last_error.startswith("outside_window")
    assert tagged.status == "sent"
    assert [m.text for _, m, _ in channel.calls][-1] == "your order shipped"


async def test_messages_of_one_subscriber_keep_their_order(make_platform) -> None:
    channel = ScriptedChannel([SendResult.transient("down")])
    platform = await scripted_platform(make_platform, channel)
    await platform.engine.handle(start())
    async with platform.db.session() as session:
        subscriber = await session.scalar(select(Subscriber))
        await platform.outbox.enqueue(session, subscriber, [
            (None, Outgoing(text=f"second {n}")) for n in range(3)])
    await platform.drain()
    # The first failed; nothing after it may overtake it.
    assert [m.text[:8] for _, m, _ in channel.calls] == ["Hi there"]
    platform.clock.advance(timedelta(minutes=5))
    await platform.drain()
    assert [m.text[:8] for _, m, _ in channel.calls] == [
        "Hi there", "Hi there", "second 0", "second 1", "second 2"]


async def test_a_dead_workers_claim_is_taken_over_after_its_lease(make_platform) -> None:
    channel = ScriptedChannel()
    platform = await scripted_platform(make_platform, channel)
    await platform.engine.handle(start())
    lease_end = platform.clock.now() + timedelta(seconds=30)
    async with platform.db.session() as session:
        await session.execute(update(Outbox).values(
            status="sending", locked_by="dead-worker", lease_expires_at=lease_end))
    await platform.drain()
    assert channel.calls == []  # the lease still holds
    platform.clock.advance(timedelta(seconds=31))
    await platform.drain()
    await platform.drain()
    assert channel.delivered() == [("u1", "Hi there! ")]
    [row] = await outbox_rows(platform)
    assert (row.status, row.locked_by) == ("sent", None)


async def test_a_live_but_slow_workers_claim_is_renewed_not_taken_over(make_platform) -> None:
    """The heartbeat: a worker that holds a row longer than a lease (waiting for its
    rate-limit slot, say) keeps it; only a dead worker's claims expire."""
    channel = ScriptedChannel()
    platform = await scripted_platform(make_platform, channel)
    await platform.engine.handle(start())
    slow = platform.worker.delivery
    other = another_worker(platform)
    rows, _ = await slow.claim_batch()
    assert len(rows) == 1
    for _ in range(3):  # three leases' worth of time, renewed as it passes
        platform.clock.advance(timedelta(seconds=20))
        assert await slow.renew_leases() == 1
        assert await other.run_once() == 0  # nothing to take over
    assert channel.calls == []
    await slow.deliver(rows[0])
    assert channel.delivered() == [("u1", "Hi there! ")]
    assert await slow.renew_leases() == 0  # nothing held any more


async def test_a_row_dropped_without_a_result_is_not_renewed_but_retried(
        make_platform, monkeypatch) -> None:
    """The heartbeat renews only rows still in hand: one whose result could not be
    written (the database stayed away past the lease) expires and is sent by another."""
    channel = ScriptedChannel()
    platform = await scripted_platform(make_platform, channel)
    await platform.engine.handle(start())
    dropping = platform.worker.delivery
    other = another_worker(platform)

    async def database_away(outcomes) -> None:
        raise ConnectionError("the database is away")

    monkeypatch.setattr(dropping.results, "_write_until_stored", database_away)
    [row], _ = await dropping.claim_batch()
    with pytest.raises(ConnectionError):
        await dropping.deliver(row)
    assert await dropping.renew_leases() == 0
    platform.clock.advance(timedelta(seconds=31))
    assert await other.run_once() == 1
    assert [user for user, _ in channel.delivered()] == ["u1", "u1"]  # sent, then resent
    [row] = await outbox_rows(platform)
    assert (row.status, row.locked_by) == ("sent", None)


async def test_long_text_and_many_buttons_are_fitted_into_several_rows(make_platform) -> None:
    channel = ScriptedChannel(max_text_length=20, max_buttons=2)
    platform = await scripted_platform(make_platform, channel)
    await platform.engine.handle(start())
    await platform.drain()
    texts = [m.text for _, m, _ in channel.calls]
    assert all(len(t) <= 20 for t in texts)
    assert sum(len(m.buttons) for _, m, _ in channel.calls) == 3
    assert all(len(m.buttons) <= 2 for _, m, _ in channel.calls)
    rows = await outbox_rows(platform)
    assert len(rows) == len(channel.calls) and all(r.status == "sent" for r in rows)


async def test_rate_limiter_per_chat_and_per_bot() -> None:
    now = [0.0]
    limiter = MemoryRateLimiter(monotonic=lambda: now[0])
    limits = Limits(per_bot=10, per_chat=1, chat_burst=2, bot_burst=10)
    waits = [await limiter.reserve("bot", "chat", limits, max_wait=100) for _ in range(4)]
    assert waits == [0, 0, 1.0, 2.0]
    # Another chat is only held by the bot-wide bucket (10/s: 4 of 10 used).
    assert await limiter.reserve("bot", "other", limits, max_wait=100) == 0
    assert await limiter.reserve("bot", "chat", limits, max_wait=0.5) == 3.0  # not reserved
    await limiter.pause("bot", 20)
    assert await limiter.reserve("bot", "other", limits, max_wait=100) == 20
    now[0] = 25
    assert await limiter.reserve("bot", "chat", limits, max_wait=100) == 0

"""Broadcast rows yield to this process's turns in flight (issue 15, item 0): in one
``botp run`` process a broadcast's sends share the event loop and the SQLite connection
with the webhooks' turns. A bulk row's send waits while a turn runs (at most the cap);
an interactive row never waits. Orders of events, no wall clock."""

from __future__ import annotations

import asyncio

from bot_platform.clock import SystemClock
from bot_platform.config import BotConfig, WorkerSettings
from bot_platform.delivery import Delivery
from bot_platform.outbox_results import ClaimedRow
from bot_platform.pressure import InteractivePressure
from bot_platform.ratelimit import MemoryRateLimiter
from bot_platform.statuses import SubscriberStatus
from bot_platform.types import SendResult
from tests.support.scripted import ScriptedChannel, start


def delivery_with(channel: ScriptedChannel, pressure: InteractivePressure) -> Delivery:
    delivery = Delivery(None, lambda name, bot: channel, lambda name, bot: None,  # type: ignore[arg-type]
                        MemoryRateLimiter(), SystemClock(), WorkerSettings(), "w1")
    delivery.pressure = pressure
    delivery._still_ours = lambda row: True  # type: ignore[method-assign]

    async def record(row: ClaimedRow, result: SendResult, skipped: bool = False) -> None:
        pass

    delivery.record = record  # type: ignore[method-assign]
    return delivery


def row(id: int, recipient: str, broadcast_id: int | None, urgent: bool) -> ClaimedRow:
    return ClaimedRow(id=id, message_id=id, subscriber_id=id, channel="scripted", bot_id="b1",
                      recipient=recipient, payload={"text": recipient}, attempts=0,
                      subscriber_status=SubscriberStatus.SUBSCRIBED, last_inbound_at=None,
                      broadcast_id=broadcast_id, urgent=urgent)


async def settle(turns: int = 20) -> None:
    for _ in range(turns):
        await asyncio.sleep(0)


async def test_a_broadcast_row_waits_for_the_turn_in_flight_a_reply_does_not() -> None:
    channel = ScriptedChannel()
    pressure = InteractivePressure(max_wait=3600)  # the cap never decides here
    delivery = delivery_with(channel, pressure)
    with pressure.turn():
        bulk = asyncio.create_task(delivery.deliver(row(1, "bulk", 7, urgent=False)))
        await delivery.deliver(row(2, "reply", None, urgent=True))
        await settle()
        assert [r for r, _, _ in channel.calls] == ["reply"]
        assert not bulk.done()
    await bulk
    assert [r for r, _, _ in channel.calls] == ["reply", "bulk"]


async def test_a_broadcast_row_waits_at_most_the_cap() -> None:
    """A constant stream of webhooks cannot starve a broadcast."""
    channel = ScriptedChannel()
    pressure = InteractivePressure(max_wait=0)
    delivery = delivery_with(channel, pressure)
    with pressure.turn():
        await delivery.deliver(row(1, "bulk", 7, urgent=False))
        assert [r for r, _, _ in channel.calls] == ["bulk"]


async def test_the_engine_counts_its_turns_and_the_platform_shares_them(make_platform
                                                                         ) -> None:
    platform = await make_platform(bots=[BotConfig(id="b1", channel="scripted")],
                                   channel_overrides={("scripted", "b1"): ScriptedChannel()})
    assert platform.worker.delivery.pressure is platform.engine.pressure
    seen: list[int] = []

    async def watch(context, call_next) -> None:
        seen.append(platform.engine.pressure.in_flight)
        await call_next(context)

    platform.engine.steps.insert(0, watch)
    await platform.engine.handle(start())
    assert seen == [1]
    assert platform.engine.pressure.in_flight == 0


async def test_a_broadcast_row_waits_until_the_answer_is_sent_not_only_committed() -> None:
    """Claiming and sending the answer took most of a reply's time while a broadcast ran:
    the pressure lasts until the rows the turn queued are sent."""
    channel = ScriptedChannel()
    pressure = InteractivePressure(max_wait=3600)
    delivery = delivery_with(channel, pressure)
    with pressure.turn():
        pressure.queued([2])
    assert pressure.busy  # the turn is over, its answer is not sent yet
    bulk = asyncio.create_task(delivery.deliver(row(1, "bulk", 7, urgent=False)))
    await settle()
    assert not bulk.done() and channel.calls == []
    await delivery.deliver(row(2, "reply", None, urgent=True))
    await bulk
    assert [r for r, _, _ in channel.calls] == ["reply", "bulk"]
    assert not pressure.busy


async def test_an_answer_row_never_sent_here_stops_counting_after_its_hold() -> None:
    """A row held for a webhook response, or delivered by another process, does not keep
    broadcasts waiting for longer than ``hold``."""
    now = [0.0]
    pressure = InteractivePressure(max_wait=3600, hold=1.0, monotonic=lambda: now[0])
    pressure.queued([5])
    assert pressure.busy
    now[0] = 1.5
    assert not pressure.busy
    await pressure.yield_to_interactive()  # returns at once


async def test_the_answer_of_a_handled_event_keeps_the_pressure_until_delivered(
        make_platform) -> None:
    platform = await make_platform(bots=[BotConfig(id="b1", channel="scripted")],
                                   channel_overrides={("scripted", "b1"): ScriptedChannel()})
    handled = await platform.engine.handle(start())
    assert handled.outbox_ids and platform.engine.pressure.busy
    await platform.worker.drain()
    assert not platform.engine.pressure.busy


async def test_an_urgent_session_gets_the_sqlite_connection_before_waiting_bulk_ones(
        tmp_path) -> None:
    """The pool handed its one connection out first come, first served: a reply's turn
    and claim waited behind every broadcast claim and result write queued before them."""
    from bot_platform.database import Database

    db = Database(f"sqlite+aiosqlite:///{tmp_path}/gate.sqlite3")
    order: list[str] = []

    async def session(name: str, urgent: bool) -> None:
        async with db.session(urgent=urgent):
            order.append(name)

    try:
        async with db.session():  # a broadcast's transaction in progress
            waiting = [asyncio.create_task(session("bulk claim", False)),
                       asyncio.create_task(session("bulk write", False))]
            await settle()
            waiting.append(asyncio.create_task(session("reply", True)))
            await settle()
            assert order == []
        await asyncio.gather(*waiting)
        assert order == ["reply", "bulk claim", "bulk write"]
    finally:
        await db.close()


async def test_a_cancelled_waiter_passes_the_connection_on(tmp_path) -> None:
    from bot_platform.database import ConnectionGate

    gate = ConnectionGate()
    await gate.acquire(urgent=False)
    gone = asyncio.create_task(gate.acquire(urgent=True))
    after = asyncio.create_task(gate.acquire(urgent=False))
    await settle()
    gone.cancel()
    gate.release()
    await settle()
    assert gone.cancelled() and after.done()
    gate.release()
    await gate.acquire(urgent=False)  # free again: taken at once


async def test_a_send_job_with_enough_rows_ahead_queues_a_small_batch_after_answers(
        make_platform, monkeypatch) -> None:
    """Rows already waiting for the workers: the send job is in no hurry, so it waits for
    the answer under way (instead of the brief cap) and then holds the write lock for a
    small batch only."""
    from bot_platform import broadcasts

    platform = await make_platform(bots=[BotConfig(id="b1", channel="scripted")],
                                   channel_overrides={("scripted", "b1"): ScriptedChannel()})
    job = broadcasts.SendJob(platform.engine)
    pressure = platform.engine.pressure
    pressure.max_wait = 0  # the brief cap: would not wait at all
    ahead = [0]

    async def counted() -> int:
        return ahead[0]

    monkeypatch.setattr(job, "_ahead", counted)
    ahead[0] = broadcasts.AHEAD
    # Nobody has talked to this process (a worker): full batches, as fast as it can.
    assert await job.prepare(None) == broadcasts.BATCH
    ahead[0] = 0
    with pressure.turn():
        assert await job.prepare(None) == broadcasts.BATCH  # the workers need rows
    ahead[0] = broadcasts.AHEAD
    with pressure.turn():
        prepared = asyncio.create_task(job.prepare(None))
        await settle()
        assert not prepared.done()  # waits for the answer under way
    assert await prepared == broadcasts.RELAXED_BATCH
    monkeypatch.setattr(broadcasts, "BATCH", 10)
    assert await job.prepare(None) == 10  # never more than a batch


async def test_an_answers_results_are_written_apart_and_urgently() -> None:
    """A subscriber's next row waits for the result of the one before: a reply's result
    does not wait behind a broadcast's batch of results, nor in the queue for SQLite's
    connection."""
    delivery = Delivery(None, lambda name, bot: None, lambda name, bot: None,  # type: ignore[arg-type]
                        MemoryRateLimiter(), SystemClock(), WorkerSettings(), "w1")
    bulk_written = asyncio.Event()
    writes: list[tuple[list[int], bool]] = []

    async def write(outcomes, urgent: bool = False) -> None:
        writes.append(([o.row.id for o in outcomes], urgent))
        if not urgent:
            await bulk_written.wait()  # a long broadcast batch

    delivery.outbox.write = write  # type: ignore[method-assign]
    bulk = asyncio.create_task(delivery.record(row(1, "bulk", 7, urgent=False),
                                               SendResult.sent("m1")))
    await settle()
    await delivery.record(row(2, "reply", None, urgent=True), SendResult.sent("m2"))
    assert writes == [([1], False), ([2], True)] and not bulk.done()
    bulk_written.set()
    await bulk


async def test_bulk_sessions_wait_for_answers_under_way_urgent_ones_do_not(tmp_path) -> None:
    """A broadcast's claim or write taking SQLite's connection just before a reply's turn
    needs it holds it for several turns of a busy event loop."""
    from bot_platform.database import URGENT, Database

    db = Database(f"sqlite+aiosqlite:///{tmp_path}/gate.sqlite3")
    pressure = InteractivePressure(max_wait=3600)
    db.before_bulk = pressure.yield_to_interactive
    order: list[str] = []

    async def session(name: str, urgent: bool | None = None) -> None:
        async with db.session(urgent=urgent):
            order.append(name)

    async def webhook() -> None:
        URGENT.set(True)  # what app.webhook does for its request
        await session("webhook")

    try:
        with pressure.turn():
            bulk = asyncio.create_task(session("bulk"))
            await settle()
            await session("reply", urgent=True)
            await asyncio.create_task(webhook())
            await settle()
            assert order == ["reply", "webhook"] and not bulk.done()
        await bulk
        assert order == ["reply", "webhook", "bulk"]
    finally:
        await db.close()

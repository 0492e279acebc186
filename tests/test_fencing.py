"""A worker sends only what it still owns: a row whose lease lapsed while the worker was
paused (SIGSTOP, a VM pause, a long GC) is dropped unsent, because another worker may
already have taken it over and sent it.

The fast tests drive the deadline logic with a manual monotonic clock; the slow one
freezes a real ``botp worker`` past its lease on PostgreSQL while another takes over.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, insert, select

from bot_platform import broadcasts
from bot_platform.clock import SystemClock
from bot_platform.config import BotConfig
from bot_platform.database import Database
from bot_platform.migrations import upgrade
from bot_platform.models import Contact, Outbox, Subscriber
from tests.fakes.telegram_api import FakeTelegramServer
from tests.support.platform import ROOT, TestPlatform, WorkerProcess, make_settings, wait_for
from tests.support.scripted import ScriptedChannel, another_worker, outbox_rows, start
from tests.support.services import fresh_postgres_database


class Monotonic:
    """A manual stand-in for ``time.monotonic``."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def fenced_platform(make_platform, db_url: str):
    channel = ScriptedChannel()
    platform = await make_platform(bots=[BotConfig(id="b1", channel="scripted")],
                                   channel_overrides={("scripted", "b1"): channel},
                                   database_url=db_url)
    clock = Monotonic()
    platform.worker.delivery.monotonic = clock
    return platform, channel, clock


async def test_a_row_whose_lease_lapsed_in_hand_is_dropped_not_sent(make_platform,
                                                                   db_url) -> None:
    """Claimed, then frozen past the lease: on waking it sends nothing; the worker that
    took the row over sends it, once."""
    platform, channel, monotonic = await fenced_platform(make_platform, db_url)
    await platform.engine.handle(start())
    frozen = platform.worker.delivery
    [row], _ = await frozen.claim_batch()
    lease = platform.settings.worker.lease_seconds
    monotonic.now += lease + 1  # frozen: the monotonic clock kept running
    platform.clock.advance(timedelta(seconds=lease + 1))
    other = another_worker(platform)
    assert await other.run_once() == 1  # taken over and sent
    assert await frozen.deliver(row) is None  # wakes up: dropped, not sent
    assert [user for user, _ in channel.delivered()] == ["u1"]
    assert frozen.dropped == 1
    assert frozen.in_hand == {}
    [stored] = await outbox_rows(platform)
    assert (stored.status, stored.locked_by) == ("sent", None)


async def test_the_deadline_keeps_a_safety_margin_before_the_lease(make_platform,
                                                                    db_url) -> None:
    """Just inside the lease but within the margin the row is not sent either: the
    other worker's clock may run a little ahead, and the request needs time to leave.
    Nobody took it over, so it goes out once its lease has expired."""
    platform, channel, monotonic = await fenced_platform(make_platform, db_url)
    await platform.engine.handle(start())
    delivery = platform.worker.delivery
    [row], _ = await delivery.claim_batch()
    monotonic.now += platform.settings.worker.lease_seconds - 0.5
    assert await delivery.deliver(row) is None
    assert channel.calls == []
    platform.clock.advance(timedelta(seconds=platform.settings.worker.lease_seconds + 1))
    await platform.drain()
    assert [user for user, _ in channel.delivered()] == ["u1"]


async def test_a_pause_only_the_wall_clock_saw_also_drops_the_row(make_platform,
                                                                  db_url) -> None:
    """A whole machine paused (a VM) may come back with its monotonic clock unmoved and
    its wall clock corrected: the lease stamped in the row, which other workers judge by
    their wall clocks, has passed, so the row is not sent either."""
    platform, channel, _ = await fenced_platform(make_platform, db_url)
    await platform.engine.handle(start())
    delivery = platform.worker.delivery
    [row], _ = await delivery.claim_batch()
    platform.clock.advance(timedelta(seconds=platform.settings.worker.lease_seconds + 1))
    assert await delivery.deliver(row) is None
    assert channel.calls == []


async def test_a_renewal_extends_the_deadline_by_what_it_proves(make_platform,
                                                                db_url) -> None:
    """The heartbeat keeps a slow (not frozen) worker's rows sendable: the deadline
    moves to the moment the renewal was issued plus the lease."""
    platform, channel, monotonic = await fenced_platform(make_platform, db_url)
    await platform.engine.handle(start())
    delivery = platform.worker.delivery
    lease = platform.settings.worker.lease_seconds
    [row], _ = await delivery.claim_batch()
    for _ in range(4):  # four leases' worth of time, renewed as it passes
        monotonic.now += lease / 2
        platform.clock.advance(timedelta(seconds=lease / 2))
        assert await delivery.renew_leases() == 1
    monotonic.now += lease / 2
    assert delivery.owns(row)
    assert await delivery.deliver(row) is not None
    assert [user for user, _ in channel.delivered()] == ["u1"]


async def test_a_renewal_that_finds_the_row_taken_over_does_not_extend_it(
        make_platform, db_url) -> None:
    platform, channel, monotonic = await fenced_platform(make_platform, db_url)
    await platform.engine.handle(start())
    frozen = platform.worker.delivery
    lease = platform.settings.worker.lease_seconds
    [row], _ = await frozen.claim_batch()
    monotonic.now += lease + 1
    platform.clock.advance(timedelta(seconds=lease + 1))
    other = another_worker(platform)
    taken, _ = await other.claim_batch()
    assert [r.id for r in taken] == [row.id]
    assert await frozen.renew_leases() == 0  # the heartbeat wakes first: not ours
    assert not frozen.owns(row)
    assert await frozen.deliver(row) is None
    assert channel.calls == []
    await other.deliver(taken[0])
    assert [user for user, _ in channel.delivered()] == ["u1"]


async def test_postgres_sessions_end_an_idle_transaction_of_a_frozen_process(
        postgres_url) -> None:
    """A process frozen inside a transaction loses it (and the rows it locked) after
    the idle timeout, instead of holding them for as long as it stays frozen."""
    db = Database(postgres_url, idle_in_transaction_timeout=7, statement_timeout=11)
    try:
        async with db.session() as session:
            idle = await session.scalar(select(func.current_setting(
                "idle_in_transaction_session_timeout")))
            statement = await session.scalar(select(func.current_setting(
                "statement_timeout")))
        assert (idle, statement) == ("7s", "11s")
    finally:
        await db.close()


# ---- the real thing: SIGSTOP past the lease ---------------------------------------------

TOKEN = "123456:ABC-fence"
RECIPIENTS = 60
LEASE = 3  # seconds
RATE = 10  # messages/s: the frozen worker holds rows waiting for their slots
FIRST_CHAT = 7_000_000


async def _count(platform: TestPlatform, query) -> int:
    async with platform.db.session() as session:
        return await session.scalar(query) or 0


async def _held_by(platform: TestPlatform, pid: int) -> int:
    return await _count(platform, select(func.count()).select_from(Outbox).where(
        Outbox.status == "sending", Outbox.locked_by.like(f"%:{pid}:%")))


async def _sent(platform: TestPlatform) -> int:
    return await _count(platform, select(func.count()).select_from(Outbox).where(
        Outbox.status == "sent"))


@pytest.mark.slow
@pytest.mark.postgres
async def test_a_worker_paused_past_its_lease_sends_nothing_twice(tmp_path: Path) -> None:
    async with fresh_postgres_database() as url, FakeTelegramServer() as fake:
        await asyncio.to_thread(upgrade, url)
        bot = BotConfig(id="shop", channel="telegram", token=TOKEN, secret="s",
                        api_base=fake.url, messages_per_second=RATE)
        env = {**os.environ, "BOTP_DATABASE_URL": url,
               "BOTP_FLOWS_DIR": str(ROOT / "flows"), "BOTP_LOCALES_DIR": str(ROOT / "locales"),
               "BOTP_BOTS": json.dumps([bot.model_dump(mode="json") | {"token": TOKEN,
                                                                       "secret": "s"}]),
               "BOTP_WORKER__LEASE_SECONDS": str(LEASE), "BOTP_WORKER__POLL_INTERVAL": "0.1",
               "BOTP_LOG_LEVEL": "WARNING"}
        env.pop("BOTP_REDIS_URL", None)
        platform = TestPlatform(make_settings(url, [bot]), clock=SystemClock())
        await platform.start()
        frozen = WorkerProcess(env, tmp_path / "frozen.log")
        taker = WorkerProcess(env, tmp_path / "taker.log")
        try:
            now = platform.clock.now()
            async with platform.db.session() as session:
                await session.execute(insert(Contact), [{"created_at": now}] * RECIPIENTS)
                contacts = (await session.scalars(select(Contact.id).order_by(Contact.id)))
                await session.execute(insert(Subscriber), [
                    {"contact_id": contact, "channel": "telegram", "bot_id": "shop",
                     "user_id": str(FIRST_CHAT + n), "status": "subscribed", "locale": "en",
                     "attributes": {}, "last_inbound_at": now, "created_at": now,
                     "updated_at": now} for n, contact in enumerate(contacts.all())])
                broadcast = await broadcasts.create(session, broadcasts.BroadcastCreate(
                    name="fence", filter={"channel": "telegram"}, variants=[{
                        "name": "A", "percent": 100,
                        "messages": {"en": {"text": "Spring sale: -20% today"}}}]), now)
                await broadcasts.start(session, broadcast.id, now)

            frozen.start()
            assert frozen.process is not None
            pid = frozen.process.pid
            await wait_for(lambda: _at_least(fake, 3), limit=60, what="the first sends")
            # Freeze it between two sends: nothing on its way to the fake, every answer
            # recorded, rows in hand waiting for their rate-limit slots. (A request the
            # messenger processed but whose answer was not recorded would be sent again
            # by anyone: no test can make that exactly-once.)
            for _ in range(50):
                frozen.process.send_signal(signal.SIGSTOP)
                await asyncio.sleep(0.3)  # what was on its way arrives
                if (await _sent(platform) == len(fake.sent())
                        and await _held_by(platform, pid) > 0):
                    break
                frozen.process.send_signal(signal.SIGCONT)
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("could not freeze the worker between two sends")
            held = await _held_by(platform, pid)

            taker.start()

            async def everyone_served() -> bool:
                left = await _count(platform, select(func.count()).select_from(Outbox).where(
                    Outbox.status.in_(("pending", "sending"))))
                return left == 0 and len({c.params["chat_id"] for c in fake.sent()}) \
                    == RECIPIENTS

            await wait_for(everyone_served, limit=120, what="the other worker's sends")
            frozen.process.send_signal(signal.SIGCONT)  # wakes up holding stale rows

            async def dropped_them() -> bool:
                log = (tmp_path / "frozen.log").read_text(errors="replace")
                return "lease lapsed" in log

            await wait_for(dropped_them, limit=60, what="the woken worker to drop its rows")
            await asyncio.sleep(1.0)  # room for a late double send to show

            per_chat = Counter(int(call.params["chat_id"]) for call in fake.sent())
            assert held > 0
            assert len(per_chat) == RECIPIENTS
            assert [chat for chat, count in per_chat.items() if count > 1] == []
            assert await _sent(platform) == RECIPIENTS
        finally:
            frozen.stop()
            taker.stop()
            await platform.close()
            for worker in (frozen, taker):
                if worker.log and worker.log.exists():
                    tail = worker.log.read_text(errors="replace")[-3000:]
                    if "Traceback" in tail:
                        print(f"--- {worker.log.name} ---\n{tail}")


async def _at_least(fake: FakeTelegramServer, count: int) -> bool:
    return len(fake.sent()) >= count

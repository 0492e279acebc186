"""Crash safety with real processes: a worker killed with SIGKILL and started again fires
every pending timer exactly once and sends a claimed-but-unsent message exactly once."""

from __future__ import annotations

import asyncio
import textwrap
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import func, select

from bot_platform.models import Job, Outbox
from tests.fakes.relay import FakeRelayServer
from tests.support.crash import crash_run
from tests.support.platform import wait_for

pytestmark = pytest.mark.slow

CRASH_FLOW = textwrap.dedent("""
    flow: crash
    triggers: [{on: start}]
    start: hello
    states:
      hello:
        say: welcome-tip-now
        after: {delay: 4s, goto: later}
      later:
        say: welcome-tip
        end: true
""")


@pytest.fixture
async def crash_setup(tmp_path: Path):
    async with crash_run(tmp_path, CRASH_FLOW) as run:
        yield run.platform, run.relay, run.worker


async def count(platform, query) -> int:
    async with platform.db.session() as session:
        return await session.scalar(query)


async def test_pending_timers_fire_exactly_once_across_a_kill(crash_setup) -> None:
    platform, relay, worker = crash_setup
    console = platform.channel("console", "console")
    users = [f"u{n}" for n in range(5)]
    for user in users:
        await platform.engine.handle(console.inbound(user, "/start"))
    sent = select(func.count()).select_from(Outbox).where(Outbox.status == "sent")
    worker.start()
    await wait_for(lambda: _at_least(platform, sent, len(users)), what="the greetings")
    # Killed with the 4 s timers usually still pending (on a loaded machine some may
    # have fired already: the counts below hold either way).
    worker.kill()

    worker.start()
    await wait_for(lambda: _received(relay, 2 * len(users)), what="the timers")
    await asyncio.sleep(2.5)  # longer than a lease: a double fire would show now
    worker.kill()

    texts = Counter((r["recipient"], r["message"]["text"][:14]) for r in relay.received)
    expected = {(u, t): 1 for u in users for t in ("Tip: a gentle ", "Tip of the day")}
    assert texts == Counter(expected)
    done = select(func.count()).select_from(Job).where(Job.status == "done",
                                                       Job.result == "fired")
    assert await count(platform, done) == len(users)


async def test_claimed_but_unsent_message_is_sent_exactly_once(crash_setup) -> None:
    platform, relay, worker = crash_setup
    console = platform.channel("console", "console")
    relay.delay = 30  # the messenger hangs: the worker holds the row mid-send
    await platform.engine.handle(console.inbound("u1", "/start"))
    sending = select(func.count()).select_from(Outbox).where(Outbox.status == "sending")

    worker.start()
    await wait_for(lambda: _at_least(platform, sending, 1), what="the claim")
    await asyncio.sleep(0.3)  # the request is in flight
    worker.kill()
    assert relay.received == []

    relay.delay = 0
    worker.start()
    await wait_for(lambda: _received(relay, 1), what="the resend")
    await asyncio.sleep(2.5)
    worker.kill()
    greetings = [r for r in relay.received if r["message"]["text"].startswith("Tip: a gentle")]
    assert [r["recipient"] for r in greetings] == ["u1"]
    async with platform.db.session() as session:
        first = await session.scalar(select(Outbox).order_by(Outbox.id).limit(1))
        assert first.status == "sent"


async def _received(relay: FakeRelayServer, n: int) -> bool:
    return len(relay.received) >= n


async def _at_least(platform, query, n: int) -> bool:
    return await count(platform, query) >= n


async def test_killed_mid_broadcast_nobody_twice_nobody_skipped(crash_setup) -> None:
    from bot_platform import broadcasts
    from bot_platform.models import Broadcast, Contact, Subscriber

    platform, relay, worker = crash_setup
    worker.env["BOTP_WORKER__CONCURRENCY"] = "1"  # one send in flight: the kill lands on it
    now = platform.clock.now()
    async with platform.db.session() as session:
        for n in range(120):
            contact = Contact(created_at=now)
            session.add(contact)
            await session.flush()
            session.add(Subscriber(contact_id=contact.id, channel="console", bot_id="console",
                                   user_id=f"b{n}", status="subscribed", attributes={},
                                   created_at=now, updated_at=now))
        broadcast = await broadcasts.create(session, broadcasts.BroadcastCreate(
            name="crash", filter={"channel": "console"}, variants=[{
                "name": "A", "percent": 100, "messages": {"en": {"text": "Sale!"}}}]), now)
        await broadcasts.start(session, broadcast.id, now)
        broadcast_id = broadcast.id

    relay.hang_after = 50  # the 51st send hangs: the worker is killed holding it
    worker.start()
    await wait_for(lambda: _received(relay, 50), what="the first 50")
    await asyncio.sleep(0.5)
    worker.kill()
    assert len(relay.received) == 50

    relay.hang_after = None
    worker.start()
    await wait_for(lambda: _received(relay, 120), limit=60, what="the rest")
    await asyncio.sleep(2.5)  # past a lease: a double send would show now
    worker.kill()
    recipients = Counter(r["recipient"] for r in relay.received)
    assert len(recipients) == 120 and set(recipients.values()) == {1}
    async with platform.db.session() as session:
        stats = await broadcasts.stats(session, await session.get(Broadcast, broadcast_id))
    assert stats["A"]["sent"] == 120

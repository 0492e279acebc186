"""Group commit of inbound events on SQLite (bot_platform/event_groups.py): events of
different subscribers that arrive together share one transaction, each in a savepoint of
its own. A bad event rolls back only itself (its neighbours commit and are answered, and
it can be sent again), a duplicate is processed once, and a subscriber's events apply in
arrival order."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from bot_platform.inbound import EventContext, Next
from bot_platform.models import Message, Outbox, ProcessedEvent, Subscriber
from bot_platform.privacy import event_key
from tests.support.engine import echo_flows

USERS = ("u1", "bad", "u2", "u3")


async def subscribers(platform: Any) -> set[str]:
    async with platform.db.session() as session:
        return set((await session.scalars(select(Subscriber.user_id))).all())


async def count(platform: Any, model: Any) -> int:
    async with platform.db.session() as session:
        return await session.scalar(select(func.count()).select_from(model))


def fail_for(platform: Any, user: str, how: str) -> None:
    """A last step that fails ``user``'s event after everything else of it was written:
    ``raise`` raises in the step; ``flush`` makes the ORM flush fail (SQLAlchemy then
    rolls the whole transaction back, not only the event's savepoint); ``early`` raises
    before the event ran a statement (its neighbour's savepoint must not be the one
    rolled back)."""
    async def step(context: EventContext, call_next: Next) -> None:
        if how == "early" and context.inbound.user_id == user:
            raise RuntimeError("this event is bad before any statement of its own")
        await call_next(context)
        if context.inbound.user_id != user:
            return
        if how == "raise":
            raise RuntimeError("this event is bad")
        i = context.inbound
        assert context.session is not None
        context.session.add(ProcessedEvent(  # its own dedupe row again: a duplicate key
            channel=i.channel, bot_id=i.bot_id, event_id=event_key(i.event_id),
            processed_at=platform.clock.now()))
    steps = platform.engine.steps
    if how == "early":  # right inside the transaction, before dedupe
        steps.insert(steps.index(platform.engine.step_transaction) + 1, step)
    else:
        steps.append(step)


@pytest.mark.parametrize("how", ["raise", "flush", "early"])
async def test_a_bad_event_in_a_group_rolls_back_only_itself(
        make_platform, how: str, caplog: pytest.LogCaptureFixture) -> None:
    platform = await make_platform()
    console, engine = platform.channel("console", "console"), platform.engine
    fail_for(platform, "bad", how)
    events = [console.inbound(user, "/start") for user in USERS]
    groups = engine.groups.groups
    with caplog.at_level(logging.INFO, "bot_platform.event_groups"):
        results = await asyncio.gather(*(engine.handle(e) for e in events),
                                       return_exceptions=True)
    # An ORM flush error loses the whole transaction: the others ran again in the next.
    assert ("running again" in caplog.text) == (how == "flush")
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(errors) == 1 and results[1] is errors[0]
    if how != "flush":  # one transaction for all four
        assert engine.groups.groups == groups + 1
    assert all(r.outbox_ids and not r.duplicate for i, r in enumerate(results) if i != 1)
    assert await subscribers(platform) == {"u1", "u2", "u3"}  # nothing of "bad" stayed
    assert await count(platform, ProcessedEvent) == 3
    await platform.drain()
    assert {user for user, _ in console.sent} == {"u1", "u2", "u3"}  # answered

    platform.engine.steps.remove(  # the messenger sends the bad one again: it goes through
        next(s for s in platform.engine.steps if getattr(s, "__name__", "") == "step"))
    again = await engine.handle(events[1])
    assert not again.duplicate and again.outbox_ids
    assert await subscribers(platform) == set(USERS)
    sent = len(console.sent)
    await platform.drain()
    assert len(console.sent) > sent
    # Every event's messages were queued once: none was run twice into the database.
    async with platform.db.session() as session:
        per_user = (await session.execute(
            select(Subscriber.user_id, func.count(Outbox.id))
            .join(Outbox, Outbox.subscriber_id == Subscriber.id)
            .group_by(Subscriber.user_id))).all()
    assert len({n for _, n in per_user}) == 1


async def test_a_duplicate_webhook_among_a_group_is_processed_once(make_platform) -> None:
    platform = await make_platform()
    console, engine = platform.channel("console", "console"), platform.engine
    twice = console.inbound("u1", "/start")
    others = [console.inbound(user, "/start") for user in ("u2", "u3")]
    groups = engine.groups.groups
    results = await asyncio.gather(engine.handle(twice), *(engine.handle(e) for e in others),
                                   engine.handle(twice), engine.handle(twice))
    assert [r.duplicate for r in results] == [False, False, False, True, True]
    assert engine.groups.groups < groups + len(results)  # some shared a transaction
    assert await count(platform, ProcessedEvent) == 3
    async with platform.db.session() as session:
        inbound = (await session.scalars(select(Subscriber.user_id).join(
            Message, Message.subscriber_id == Subscriber.id).where(
            Message.direction == "in"))).all()
    assert sorted(inbound) == ["u1", "u2", "u3"]
    await platform.drain()
    assert [user for user, _ in console.sent].count("u1") == \
        [user for user, _ in console.sent].count("u2")


async def test_each_subscribers_events_apply_in_order_across_groups(
        make_platform, tmp_path: Path) -> None:
    flows = echo_flows(tmp_path)
    platform = await make_platform(flows_dir=flows)
    console, engine = platform.channel("console", "console"), platform.engine
    users = [f"u{n}" for n in range(6)]
    await asyncio.gather(*(engine.handle(console.inbound(u, "/start")) for u in users))
    groups = engine.groups.groups
    events = [console.inbound(u, str(n)) for n in range(15) for u in users]  # interleaved
    await asyncio.gather(*(engine.handle(e) for e in events))
    assert engine.groups.groups - groups <= len(events) // 2  # they were grouped
    async with platform.db.session() as session:
        logs = dict((await session.execute(
            select(Subscriber.user_id, Subscriber.attributes))).all())
    expected = "," + ",".join(str(n) for n in range(15))
    assert {u: logs[u]["log"] for u in users} == {u: expected for u in users}

"""The unit of work per subscriber (bot_platform/turns.py): a subscriber's turns run one
after the other (in arrival order in a process, by the advisory lock across processes),
other subscribers' turns do not wait for them, flows never act for someone unsubscribed
or talking to a human, and workers are woken only for what committed."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta

import pytest
from sqlalchemy import func, select, text, update

from bot_platform.events import dispatch
from bot_platform.models import Conversation, FlowState, Outbox, Subscriber
from bot_platform.turns import Turns
from tests.support.platform import wait_for

ALEX = ("console", "console", "alex")
SAM = ("console", "console", "sam")


def holds(condition: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    """``condition`` as the awaitable predicate ``wait_for`` polls."""
    async def check() -> bool:
        return condition()
    return check


async def _subscriber(platform, user: str = "alex") -> int:
    """A subscriber who said hello (the chat's first message makes them one)."""
    console = platform.channel("console", "console")
    await platform.engine.handle(console.inbound(user, "hello"))
    async with platform.db.session() as session:
        return await session.scalar(select(Subscriber.id).where(Subscriber.user_id == user))


async def test_turns_of_one_subscriber_run_one_after_the_other_in_order(
        make_platform, db_url) -> None:
    platform = await make_platform(database_url=db_url)
    turns = platform.engine.turns
    log: list[str] = []
    release = asyncio.Event()

    async def turn(name: str, wait: asyncio.Event | None = None) -> None:
        async with turns.open(ALEX) as unit:
            log.append(f"{name} in")
            await unit.session.execute(select(1))
            if wait is not None:
                await wait.wait()
            log.append(f"{name} out")

    first = asyncio.create_task(turn("a", release))
    await wait_for(holds(lambda: log == ["a in"]), what="the first turn to start")
    later = [asyncio.create_task(turn("b")), asyncio.create_task(turn("c"))]
    await wait_for(holds(lambda: turns.locks.users(ALEX) == 3), what="two turns to queue")
    assert log == ["a in"]  # the others wait while the first is open
    release.set()
    await asyncio.gather(first, *later)
    assert log == ["a in", "a out", "b in", "b out", "c in", "c out"]
    assert turns.locks.users(ALEX) == 0  # no lock is left behind


@pytest.mark.postgres
async def test_the_advisory_lock_keeps_two_processes_apart_and_other_people_free(
        make_platform, postgres_url) -> None:
    """Two ``Turns`` with their own in-process locks stand for two processes: only the
    PostgreSQL advisory lock keeps them apart. Another subscriber's turn runs meanwhile."""
    platform = await make_platform(database_url=postgres_url)
    here, elsewhere = platform.engine.turns, Turns(platform.engine)
    log: list[str] = []
    release = asyncio.Event()

    async def turn(turns: Turns, identity, name: str, wait: asyncio.Event | None = None):
        async with turns.open(identity):
            log.append(f"{name} in")
            if wait is not None:
                await wait.wait()
            log.append(f"{name} out")

    async def advisory_waiters() -> int:
        async with platform.db.session() as session:
            return await session.scalar(text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"))

    first = asyncio.create_task(turn(here, ALEX, "a", release))
    await wait_for(holds(lambda: log == ["a in"]), what="the first turn to start")
    other_process = asyncio.create_task(turn(elsewhere, ALEX, "b"))
    await wait_for(advisory_waiters, what="the other process to wait for the lock")
    assert await advisory_waiters() == 1  # on the subscriber's advisory lock
    await turn(here, SAM, "sam")  # someone else is not held up
    assert log == ["a in", "sam in", "sam out"]
    release.set()
    await asyncio.gather(first, other_process)
    assert log[3:] == ["a out", "b in", "b out"]


async def test_flows_do_not_act_for_the_unsubscribed_or_a_chat_humans_own(
        make_platform, db_url) -> None:
    platform = await make_platform(database_url=db_url)
    engine = platform.engine
    subscriber_id = await _subscriber(platform)

    async def load() -> str:
        async with engine.turns.open(ALEX) as unit:
            work = await engine.turns.load(unit.session, subscriber_id)
            return work if isinstance(work, str) else "ran"

    async def flow_rows() -> int:
        async with platform.db.session() as session:
            return await session.scalar(select(func.count()).select_from(FlowState).where(
                FlowState.subscriber_id == subscriber_id, FlowState.flow == "skin_quiz"))

    assert await load() == "ran"
    async with platform.db.session() as session:
        await session.execute(update(Subscriber).values(status="unsubscribed"))
    assert await load() == "unsubscribed"
    assert await dispatch(engine, subscriber_id, "nudge", start_flows=["skin_quiz"]) == (
        True, [])
    async with platform.db.session() as session:
        await session.execute(update(Subscriber).values(status="subscribed"))
        now = platform.clock.now()
        session.add(Conversation(subscriber_id=subscriber_id, status="waiting",
                                 reason="asked_for_human", created_at=now, updated_at=now))
    assert await load() == "suppressed"
    assert await dispatch(engine, subscriber_id, "nudge", start_flows=["skin_quiz"]) == (
        True, [])
    assert await flow_rows() == 0
    async with engine.turns.open(None) as unit:
        assert await engine.turns.load(unit.session, subscriber_id + 1000) == "no-subscriber"

    async with platform.db.session() as session:
        await session.execute(update(Conversation).values(status="resolved"))
    stored, queued = await dispatch(engine, subscriber_id, "nudge", start_flows=["skin_quiz"])
    assert stored and queued  # the same event now starts the flow
    assert await flow_rows() == 1


async def test_workers_are_woken_for_what_committed_and_not_for_held_rows(
        make_platform) -> None:
    platform = await make_platform()
    engine = platform.engine
    subscriber_id = await _subscriber(platform)
    wakes: list[int] = []
    engine.on_commit = lambda: wakes.append(1)

    async def start_quiz(hold=None) -> list[int]:
        async with engine.turns.open(ALEX, hold) as unit:
            work = await engine.turns.load(unit.session, subscriber_id)
            assert not isinstance(work, str)
            work.turn.pending_starts.append("skin_quiz")
            await engine.router.run_pending_starts(work.turn)
            unit.queued.extend(await work.save(hold=hold))
        return [i for i, _ in unit.queued]

    async def outbox() -> int:
        async with platform.db.session() as session:
            return await session.scalar(select(func.count()).select_from(Outbox).where(
                Outbox.subscriber_id == subscriber_id))

    before = await outbox()
    with pytest.raises(RuntimeError):
        async with engine.turns.open(ALEX) as unit:
            work = await engine.turns.load(unit.session, subscriber_id)
            assert not isinstance(work, str)
            work.turn.pending_starts.append("skin_quiz")
            await engine.router.run_pending_starts(work.turn)
            unit.queued.extend(await work.save())
            raise RuntimeError("the turn failed after saving")
    assert (await outbox(), wakes) == (before, [])  # rolled back: nothing to wake for
    assert engine.turns.locks.users(ALEX) == 0

    held = await start_quiz(hold=timedelta(seconds=30))
    assert held and wakes == []  # held rows are the caller's to send or release
    assert await start_quiz()
    assert wakes == [1]

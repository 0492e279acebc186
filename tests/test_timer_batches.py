"""Timers fired in batches (bot_platform/job_batches.py): many subscribers' jobs in one
transaction, yet a failing turn rolls back only itself, a crash mid-batch fires each timer
exactly once after the restart, concurrent workers never fire one twice, a worker whose
lease lapsed applies nothing, and one subscriber's timers still fire in due order."""

from __future__ import annotations

import asyncio
import json
import textwrap
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import delete, func, insert, select
from sqlalchemy.ext.asyncio import create_async_engine

from bot_platform.jobs import Scheduler
from bot_platform.models import Answer, FlowState, Job, Outbox, Subscriber, SubscriberTag
from tests.fakes.relay import FakeRelayServer
from tests.support.crash import crash_run
from tests.support.platform import TestPlatform, WorkerProcess, wait_for

DAY = timedelta(days=1, seconds=1)


async def started(platform, users: list[str]) -> None:
    console = platform.channel("console", "console")
    for user in users:
        await platform.engine.handle(console.inbound(user, "/start"))


async def timer_results(platform) -> list[tuple[str, str, str | None, int]]:
    """(user, status, result, attempts) of every greeting timer."""
    async with platform.db.session() as session:
        rows = (await session.execute(
            select(Subscriber.user_id, Job.status, Job.result, Job.attempts)
            .join(Subscriber, Subscriber.id == Job.subscriber_id)
            .where(Job.kind == "flow_timer", Job.payload["state"].as_string() == "greeting")
            .order_by(Subscriber.user_id))).all()
    return [tuple(row) for row in rows]


def count_batches(scheduler: Scheduler, monkeypatch) -> list[int]:
    """Record how many jobs each batch transaction (each attempt) held."""
    sizes: list[int] = []
    original = scheduler.batches._transaction

    async def transaction(queues, left_out):
        sizes.append(sum(len(queue) for queue in queues) - len(left_out))
        return await original(queues, left_out)

    monkeypatch.setattr(scheduler.batches, "_transaction", transaction)
    return sizes


async def test_a_failing_turn_rolls_back_only_itself(make_platform, db_url, monkeypatch,
                                                     caplog) -> None:
    """Ten timers in one batch; the turn of u3 moves on, writes rows of its own, then
    fails: nothing of it is committed (no state change, no message, none of its rows),
    its job is retried later with backoff; the batch goes again without it and the other
    nine commit together."""
    platform = await make_platform(database_url=db_url)
    users = [f"u{n}" for n in range(10)]
    await started(platform, users)
    await platform.drain()  # the greetings
    platform.clock.advance(DAY)
    scheduler = platform.worker.scheduler
    fire = scheduler.handlers["flow_timer"]

    async def fails_for_u3(session, job):
        result = await fire(session, job)
        subscriber = await session.get(Subscriber, job.subscriber_id)
        if subscriber.user_id == "u3":  # writes of its own (as an action may), then fails
            subscriber.attributes = {"half": "done"}
            session.add(Answer(subscriber_id=subscriber.id, flow="welcome", question="q",
                               value="half", created_at=platform.clock.now()))
            await session.flush()
            raise RuntimeError("a bad turn")
        return result

    scheduler.handlers["flow_timer"] = fails_for_u3
    sizes = count_batches(scheduler, monkeypatch)
    await scheduler.run_once()  # the ten timers (and the daily win-back scan)
    assert sizes == [10, 9]  # all ten in one transaction; again without u3's, committed
    assert "failed as a whole" not in caplog.text
    results = await timer_results(platform)
    assert [r for r in results if r[0] != "u3"] == [
        (u, "done", "fired", 0) for u in users if u != "u3"]
    assert [r for r in results if r[0] == "u3"] == [("u3", "pending", None, 1)]
    async with platform.db.session() as session:
        states = dict((await session.execute(
            select(Subscriber.user_id, FlowState.state)
            .join(Subscriber, Subscriber.id == FlowState.subscriber_id))).all())
        tips = (await session.scalars(select(Outbox.recipient).where(
            Outbox.payload["text"].as_string().startswith("Tip of the day")))).all()
        last_error = await session.scalar(select(Job.last_error).where(
            Job.status == "pending", Job.attempts == 1))
        attributes = (await session.scalars(select(Subscriber.attributes))).all()
        answers = await session.scalar(select(func.count()).select_from(Answer))
    assert attributes == [{}] * 10 and answers == 0
    assert states == {u: "greeting" if u == "u3" else "tip" for u in users}
    assert sorted(tips) == sorted(u for u in users if u != "u3")
    assert last_error == "RuntimeError: a bad turn"

    scheduler.handlers["flow_timer"] = fire  # the retry, after its backoff, fires it
    platform.clock.advance(timedelta(minutes=10))
    await platform.drain()
    assert (await timer_results(platform))[3] == ("u3", "done", "fired", 1)
    tips = [user for user, m in platform.channel("console", "console").sent
            if m.text.startswith("Tip of the day")]
    assert sorted(tips) == sorted(users)


async def test_one_subscribers_timers_fire_in_due_order_within_a_batch(
        make_platform, db_url, monkeypatch) -> None:
    """Each subscriber gets a second timer (for the state the first leads to) due just
    after the first but with the smaller id: fired in due order both fire; in id order
    the second would find its state not yet entered ("stale")."""
    platform = await make_platform(database_url=db_url)
    users = [f"u{n}" for n in range(6)]
    await started(platform, users)
    await platform.drain()
    async with platform.db.session() as session:
        greetings = (await session.scalars(select(Job).where(Job.kind == "flow_timer"))).all()
        rows = [{c: getattr(job, c) for c in Job.__table__.columns.keys() if c != "id"}
                for job in greetings]
        await session.execute(delete(Job).where(Job.kind == "flow_timer"))
        for row in rows:  # the later timer first (smaller id), then the greeting's again
            later = {**row, "due_at": row["due_at"] + timedelta(seconds=1),
                     "payload": {"state": "tip", "version": row["payload"]["version"] + 1}}
            await session.execute(insert(Job), [later])
        await session.execute(insert(Job), rows)
    platform.clock.advance(DAY)
    scheduler = platform.worker.scheduler
    sizes = count_batches(scheduler, monkeypatch)
    await scheduler.run_once()
    assert sizes == [12]
    async with platform.db.session() as session:
        results = Counter((await session.scalars(select(Job.result).where(
            Job.status == "done", Job.kind == "flow_timer"))).all())
        states = set((await session.scalars(select(FlowState.state))).all())
    assert results == Counter({"fired": 12})
    assert states == {"offer"}
    await platform.drain()
    console = platform.channel("console", "console")
    for user in users:
        texts = [m.text[:14] for u, m in console.sent if u == user]
        assert texts.index("Tip of the day") < len(texts) - 1  # the offer came after it


@pytest.mark.postgres
async def test_concurrent_batches_on_postgres_fire_each_timer_once(make_platform,
                                                                    postgres_url) -> None:
    """Three schedulers claim and fire batches side by side (SKIP LOCKED claims, advisory
    locks in one order): every timer fires once, each chain's next timer is queued once."""
    platform = await make_platform(database_url=postgres_url)
    users = [f"u{n}" for n in range(90)]
    await started(platform, users)
    platform.clock.advance(DAY)
    schedulers = [Scheduler(platform.db, platform.engine, platform.clock,
                            platform.settings.worker.model_copy(update={"batch_size": 40}),
                            f"scheduler-{n}") for n in range(3)]
    claimed: list[int] = []

    async def run(scheduler: Scheduler) -> None:
        while n := await scheduler.run_once():
            claimed.append(n)

    await asyncio.gather(*(run(s) for s in schedulers))
    assert sum(claimed) >= 90 and len(claimed) >= 3
    async with platform.db.session() as session:
        jobs = (await session.execute(select(Job.status, Job.result, func.count()).where(
            Job.kind == "flow_timer").group_by(Job.status, Job.result))).all()
    assert sorted(jobs) == [("done", "fired", 90), ("pending", None, 90)]
    await platform.drain()
    tips = Counter(user for user, m in platform.channel("console", "console").sent
                   if m.text.startswith("Tip of the day"))
    assert tips == Counter({u: 1 for u in users})


@pytest.mark.postgres
async def test_a_claims_batches_run_side_by_side_on_postgres(make_platform, postgres_url,
                                                             monkeypatch) -> None:
    """One claim of 130 timers is three batches, on PostgreSQL in transactions that run
    at the same time: every timer fires once and each chain's next timer is queued once."""
    platform = await make_platform(database_url=postgres_url)
    users = [f"u{n}" for n in range(130)]
    await started(platform, users)
    platform.clock.advance(DAY)
    scheduler = platform.worker.scheduler
    original = scheduler.batches._transaction
    open_now, most = 0, 0

    async def transaction(queues, left_out):
        nonlocal open_now, most
        open_now += 1
        most = max(most, open_now)
        try:
            return await original(queues, left_out)
        finally:
            open_now -= 1

    monkeypatch.setattr(scheduler.batches, "_transaction", transaction)
    while await scheduler.run_once():
        pass
    assert most > 1
    async with platform.db.session() as session:
        jobs = (await session.execute(select(Job.status, Job.result, func.count()).where(
            Job.kind == "flow_timer").group_by(Job.status, Job.result))).all()
    assert sorted(jobs) == [("done", "fired", 130), ("pending", None, 130)]
    await platform.drain()
    tips = Counter(user for user, m in platform.channel("console", "console").sent
                   if m.text.startswith("Tip of the day"))
    assert tips == Counter({u: 1 for u in users})


async def test_a_worker_whose_leases_lapsed_applies_nothing(make_platform, db_url) -> None:
    """Claimed, then paused past the lease while another worker took the timers over and
    fired them: on waking, its batch finds none of them its own and fires nothing."""
    platform = await make_platform(database_url=db_url)
    users = [f"u{n}" for n in range(5)]
    await started(platform, users)
    platform.clock.advance(DAY)
    settings = platform.settings.worker
    paused, other = (Scheduler(platform.db, platform.engine, platform.clock, settings,
                               f"scheduler-{n}") for n in range(2))
    for scheduler in (paused, other):
        scheduler.handlers = dict(platform.worker.scheduler.handlers)
    claimed = [c for c in await paused.claim(10) if c[1] == "flow_timer"]
    assert len(claimed) == 5
    platform.clock.advance(timedelta(seconds=settings.lease_seconds + 1))
    await other.run_once()  # taken over and fired
    await paused._run_claimed(claimed, asyncio.Semaphore(1))  # wakes up
    assert [r[1:3] for r in await timer_results(platform)] == [("done", "fired")] * 5
    await platform.drain()
    tips = Counter(user for user, m in platform.channel("console", "console").sent
                   if m.text.startswith("Tip of the day"))
    assert tips == Counter({u: 1 for u in users})
    assert not any(job_id in paused.leases.in_hand for job_id, _, _ in claimed)


CRASH_FLOW = textwrap.dedent("""
    flow: crash
    triggers: [{on: start}]
    start: hello
    states:
      hello:
        after: {delay: 1s, goto: later}
      later:
        say: welcome-tip
        end: true
""")


@pytest.mark.slow
async def test_a_worker_killed_mid_batch_fires_each_timer_once(tmp_path: Path) -> None:
    """A real ``botp worker`` is killed while it holds claimed timers (some batches
    committed, the rest in hand); started again, it fires every timer exactly once:
    one ``done`` mark and one queued message each."""
    async with crash_run(tmp_path, CRASH_FLOW) as run:
        await _killed_mid_batch(run.platform, run.relay, run.worker, run.url)


async def _killed_mid_batch(platform: TestPlatform, relay: FakeRelayServer,
                            worker: WorkerProcess, url: str) -> None:
    reader = create_async_engine(url)
    try:
        users = [f"u{n}" for n in range(400)]
        await started(platform, users)
        await asyncio.sleep(1.2)  # every timer is due

        async def count(status: str) -> int:
            # A plain reader: the platform's sessions take the write lock (BEGIN
            # IMMEDIATE) and would wait for the worker's batches to end.
            async with reader.connect() as connection:
                return await connection.scalar(select(func.count()).select_from(Job).where(
                    Job.kind == "flow_timer", Job.status == status))

        async def some_fired() -> bool:
            return await count("done") > 0

        worker.start()
        await wait_for(some_fired, what="the first batch")
        worker.kill()
        done, running = await count("done"), await count("running")
        assert 0 < done < len(users)
        assert running > 0  # killed holding claimed timers

        async def all_fired() -> bool:
            return await count("done") >= len(users)

        worker.start()
        await wait_for(all_fired, limit=60, what="every timer")
        await asyncio.sleep(2.5)  # longer than a lease: a double fire would show now
        worker.kill()
        # One message queued per timer fired. (The relay may have seen a message twice:
        # a send the kill cut off between the messenger's answer and its commit, the
        # delivery's documented window, not a timer's.)
        async with reader.connect() as connection:
            queued = Counter((await connection.scalars(select(Outbox.recipient))).all())
            fired = await connection.scalar(select(func.count()).select_from(Job).where(
                Job.kind == "flow_timer", Job.result == "fired"))
        assert queued == Counter({u: 1 for u in users})
        assert fired == len(users)
        assert set(r["recipient"] for r in relay.received) <= set(users)
    finally:
        await reader.dispose()


CHAIN = textwrap.dedent("""
    flow: chain
    triggers: [{on: start}]
    start: a
    states:
      a:
        actions: [{tag: first}]
        say: welcome-tip-now
        after: {delay: 1h, goto: b}
      b:
        actions:
          - untag: first
          - tag: second
          - set: {stage: b}
          - start_flow: side
        say:
          - text: welcome-offer
            fallback: {after: 6h, channel: console}
        after: {delay: 1h, goto: c}
      c:
        say: welcome-tip
        end: true
""")
SIDE = textwrap.dedent("""
    flow: side
    triggers: [{on: keyword, keywords: [side]}]
    start: s
    states:
      s:
        say: welcome-tip
        end: true
""")


async def snapshot(platform) -> dict[str, list]:
    """What the turns wrote, without row ids."""
    async with platform.db.session() as session:
        users = dict((await session.execute(select(Subscriber.id, Subscriber.user_id))).all())
        subscribers = (await session.scalars(select(Subscriber))).all()
        states = (await session.scalars(select(FlowState))).all()
        jobs = (await session.scalars(select(Job).where(Job.kind != "inactivity_scan"))).all()
        outbox = (await session.scalars(select(Outbox))).all()
        tags = (await session.execute(select(SubscriberTag.subscriber_id,
                                             SubscriberTag.tag))).all()
    return {
        "subscribers": sorted((s.user_id, s.attributes, s.locale) for s in subscribers),
        "states": sorted((users[s.subscriber_id], s.flow, s.state, s.version, s.status,
                          s.data, s.updated_at) for s in states),
        "jobs": sorted((users[j.subscriber_id], j.kind, j.flow or "", j.status,
                        j.result or "", json.dumps({k: v for k, v in j.payload.items()
                                                    if k != "outbox_id"}, sort_keys=True),
                        j.due_at) for j in jobs),
        "outbox": sorted((o.recipient, o.payload.get("text", "")[:20], o.status)
                         for o in outbox),
        "tags": sorted((users[s], tag) for s, tag in tags),
    }


async def test_a_batch_writes_what_single_turns_write(make_platform, tmp_path: Path) -> None:
    """The same timers fired in one batch (bulk load and save) and one job at a time
    (``Turns.load`` / ``Work.save``) leave the same rows: states, versions, tags added
    and removed, attributes, a flow started, the next timers, a read fallback, the
    voided timers and the queued messages."""
    flows = tmp_path / "chain-flows"
    flows.mkdir()
    (flows / "chain.yaml").write_text(CHAIN)
    (flows / "side.yaml").write_text(SIDE)
    users = [f"u{n}" for n in range(6)]
    snapshots = []
    for batched in (True, False):
        platform = await make_platform(flows_dir=flows)
        await started(platform, users)
        scheduler = platform.worker.scheduler
        for round_ in range(2):  # a -> b, then b -> c
            platform.clock.advance(timedelta(hours=1, seconds=1))
            if round_ == 1:  # a stray pending timer of the flow: void once b is left
                async with platform.db.session() as session:
                    await session.execute(insert(Job), [{
                        "kind": "flow_timer", "subscriber_id": n + 1, "flow": "chain",
                        "payload": {"state": "b", "version": 0}, "status": "pending",
                        "due_at": platform.clock.now() + timedelta(days=9),
                        "created_at": platform.clock.now()} for n in range(len(users))])
            if batched:
                await scheduler.run_once()
            else:
                for job_id, _, identity in await scheduler.claim(100):
                    await scheduler.run_job(job_id, identity)
                    scheduler.leases.let_go(job_id)
        snapshots.append(await snapshot(platform))
    batch, single = snapshots
    assert batch == single
    assert {tag for _, tag in batch["tags"]} == {"second"}
    assert {state for _, flow, state, *_ in batch["states"]} == {"c", "s"}
    assert ("u0", "flow_timer", "chain", "done", "fired") in {j[:5] for j in batch["jobs"]}
    assert ("u0", "read_fallback") in {j[:2] for j in batch["jobs"]}
    assert ("u0", "flow_timer", "chain", "cancelled", "state-left") in {
        j[:5] for j in batch["jobs"]}
    assert ("u0", {"stage": "b"}, "en") in batch["subscribers"]

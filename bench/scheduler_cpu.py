"""CPU and round trips per fired timer, in-process: measures a shared machine skews far
less than ``bench/scheduler.py``'s timers/s.

The population of ``bench/scheduler.py`` (N welcome-chain customers, their timers due at
one instant), then one ``Scheduler.run_once`` after another in this process until nothing
is due (no delivery beside it). Prints process CPU and the event loop thread's CPU per
fired timer, fired/s, and on PostgreSQL the round trips to the server per timer (asyncpg
protocol calls: each is one trip; a prepared statement's ``prepare`` included;
``--by-statement`` lists them) and the CPU of the database's backends per timer.
``--deliver``: then the delivery of what they queued, CPU per message. ``--worker``:
instead, the worker loop as ``botp worker`` runs it (timers and deliveries side by side)
until every timer fired. The relay fake (the messenger) runs in a process of its own.

    .venv/bin/python bench/scheduler_cpu.py [--timers 6000] [--backend sqlite|postgresql]
        [--deliver | --worker] [--by-statement] [--profile FILE] [--profile-delivery FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.harness import on_database, run_until_idle  # noqa: E402
from bench.scheduler import load_population, make_due, reference_rows  # noqa: E402
from bot_platform.clock import SystemClock  # noqa: E402
from bot_platform.config import BotConfig, Settings  # noqa: E402
from bot_platform.database import Database  # noqa: E402
from bot_platform.platform import Platform  # noqa: E402

TRIPS: Counter[str] = Counter()
SQL: Counter[tuple[str, str]] | None = None  # (call, SQL) -> trips, with --by-statement


class CountingProtocol:
    """An asyncpg protocol that counts its calls that go to the server (one trip each)."""

    TRIP_CALLS = frozenset({"prepare", "bind_execute", "bind_execute_many", "bind",
                            "execute", "query", "close_statement", "copy_in", "copy_out"})

    def __init__(self, protocol: Any) -> None:
        object.__setattr__(self, "_inner", protocol)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._inner, name)
        if name in self.TRIP_CALLS and callable(value):
            def counted(*args: Any, **kwargs: Any) -> Any:
                TRIPS[name] += 1
                if SQL is not None:
                    first = args[0] if args else kwargs.get("state")
                    query = args[1] if name == "prepare" else first if name == "query" \
                        else getattr(first, "query", "?")
                    SQL[(name, " ".join(str(query).split())[:150])] += 1
                return value(*args, **kwargs)
            return counted
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._inner, name, value)


def count_trips() -> None:
    """Every asyncpg connection opened from now on counts its trips in ``TRIPS``."""
    import asyncpg.connection

    original = asyncpg.connection.Connection.__init__

    def init(self: Any, protocol: Any, *args: Any, **kwargs: Any) -> None:
        original(self, CountingProtocol(protocol), *args, **kwargs)

    asyncpg.connection.Connection.__init__ = init  # type: ignore[method-assign]


async def server_cpu(db: Database) -> dict[int, float]:
    """CPU seconds so far of each PostgreSQL backend serving this database."""
    from sqlalchemy import text

    from bench.scheduler import cpu_seconds
    async with db.engine.connect() as connection:
        pids = (await connection.scalars(text(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"))).all()
    return {pid: cpu_seconds(pid) for pid in pids}


async def fired_count(db: Database) -> Counter[str]:
    from sqlalchemy import func, select

    from bot_platform.models import Job
    async with db.session() as session:
        rows = (await session.execute(select(Job.result, func.count()).where(
            Job.kind == "flow_timer").group_by(Job.result))).all()
    return Counter({str(result): count for result, count in rows})


RELAY_PROCESS = """
import asyncio, sys
from tests.fakes.relay import FakeRelayServer
async def main():
    relay = await FakeRelayServer().start()
    print(relay.url, flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


async def run_worker(platform: Platform, db: Database, batch: Any,
                     args: argparse.Namespace) -> None:
    """The worker loop as ``botp worker`` runs it (timers and deliveries side by side),
    until every timer fired: CPU per fired timer, how many messages went out meanwhile."""
    from sqlalchemy import func, select

    from bot_platform.models import Job, Outbox
    stop = asyncio.Event()
    profile = None
    if args.profile:
        import cProfile

        profile = cProfile.Profile()
        profile.enable()
    cpu, loop, wall = time.process_time(), time.thread_time(), time.perf_counter()
    task = asyncio.create_task(platform.worker.run(stop, grace=1.0))
    reader = Database(db.url)
    try:
        while True:
            await asyncio.sleep(0.5)
            async with reader.engine.connect() as connection:
                left = await connection.scalar(select(func.count()).select_from(Job).where(
                    batch.where(), Job.status.in_(("running", "pending"))))
            if not left or time.perf_counter() - wall > args.deadline:
                break
        cpu, loop, wall = (time.process_time() - cpu, time.thread_time() - loop,
                           time.perf_counter() - wall)
        async with reader.engine.connect() as connection:
            sent = await connection.scalar(select(func.count()).select_from(Outbox).where(
                Outbox.status == "sent"))
    finally:
        stop.set()
        await task
        await reader.close()
    if profile is not None:
        profile.disable()
        profile.dump_stats(args.profile)
    results = await fired_count(db)
    fired = results.get("fired", 0)
    print(f"{db.dialect} worker loop: fired {fired} in {wall:.1f} s ({fired / wall:.0f}/s), "
          f"{sent} sent meanwhile: process CPU {1000 * cpu / max(fired, 1):.3f} ms/timer, "
          f"loop thread {1000 * loop / max(fired, 1):.3f} ms/timer "
          f"({100 * cpu / wall:.0f}% of a core)")


async def run(url: str, args: argparse.Namespace) -> None:
    from bot_platform.migrations import upgrade

    await asyncio.to_thread(upgrade, url)
    # The messenger in a process of its own, as in bench/scheduler.py.
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", RELAY_PROCESS, cwd=ROOT, stdout=asyncio.subprocess.PIPE)
    assert process.stdout is not None
    relay_url = (await process.stdout.readline()).decode().strip()
    try:
        reference = await reference_rows(url, relay_url)
        db = Database(url)
        try:
            await load_population(db, reference, args.timers)
            settings = Settings(_env_file=None, database_url=url, flows_dir=ROOT / "flows",
                                locales_dir=ROOT / "locales", log_level="WARNING",
                                bots=[BotConfig(id="console", channel="console",
                                                api_base=relay_url)])
            platform = Platform(settings, clock=SystemClock())
            await platform.start()
            try:
                batch = await make_due(db, "flow_timer", lead=0.0)
                await asyncio.sleep(0.05)
                if args.worker:
                    await run_worker(platform, db, batch, args)
                    return
                scheduler = platform.worker.scheduler
                gc.collect()
                gc.freeze()
                TRIPS.clear()
                server = await server_cpu(db) if not db.is_sqlite else {}
                rounds, cpu, loop, wall = await run_until_idle(scheduler, args.profile)
                trips = dict(TRIPS)
                if not db.is_sqlite:
                    after = await server_cpu(db)
                    used = sum(after[pid] - server.get(pid, 0.0) for pid in after)
                    fired = (await fired_count(db)).get("fired", 0)
                    print(f"  server CPU {1000 * used / max(1, fired):.3f} ms/timer "
                          f"(backends of this database)")
                results = await fired_count(db)
                fired = results.get("fired", 0)
                print(f"{db.dialect}: fired {fired} ({dict(results)}) in {rounds} claims: "
                      f"process CPU {1000 * cpu / max(fired, 1):.3f} ms/timer, loop thread "
                      f"{1000 * loop / max(fired, 1):.3f} ms/timer, {fired / wall:.0f}/s")
                if trips:
                    total = sum(trips.values())
                    print(f"  round trips {total} ({total / max(fired, 1):.3f}/timer, "
                          f"{total / max(rounds, 1):.1f}/claim of "
                          f"{settings.worker.batch_size}): {trips}")
                if SQL:
                    for (call, sql), count in SQL.most_common(40):
                        print(f"  {count:6d} {call:17s} {sql}")
                    SQL.clear()
                if args.deliver:
                    TRIPS.clear()
                    server = await server_cpu(db) if not db.is_sqlite else {}
                    if args.profile_delivery:
                        import cProfile

                        profile = cProfile.Profile()
                        profile.enable()
                    cpu, wall = time.process_time(), time.perf_counter()
                    delivered = 0
                    while done := await platform.worker.delivery.run_once():
                        delivered += done
                    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
                    if args.profile_delivery:
                        profile.disable()
                        profile.dump_stats(args.profile_delivery)
                    if not db.is_sqlite:
                        after = await server_cpu(db)
                        used = sum(after[pid] - server.get(pid, 0.0) for pid in after)
                        print(f"  server CPU {1000 * used / max(delivered, 1):.3f} ms/message")
                    print(f"  delivered {delivered}: process CPU "
                          f"{1000 * cpu / max(delivered, 1):.3f} ms/message, "
                          f"{delivered / wall:.0f}/s; trips {sum(TRIPS.values())}")
            finally:
                await platform.close()
        finally:
            await db.close()
    finally:
        process.kill()
        await process.wait()


async def main(args: argparse.Namespace) -> None:
    if args.backend != "sqlite":
        count_trips()
        if args.by_statement:
            global SQL
            SQL = Counter()
    await on_database(args.backend, lambda url: run(url, args))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timers", type=int, default=6000)
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--deliver", action="store_true",
                        help="then deliver what the timers queued (console channel)")
    parser.add_argument("--by-statement", action="store_true",
                        help="PostgreSQL: list the round trips by statement")
    parser.add_argument("--worker", action="store_true",
                        help="run the worker loop (timers and deliveries side by side, the "
                             "relay fake in another process) until every timer fired")
    parser.add_argument("--deadline", type=float, default=120.0,
                        help="--worker: stop after this many seconds")
    parser.add_argument("--profile", help="cProfile the firing into this file")
    parser.add_argument("--profile-delivery", help="cProfile the delivery into this file")
    asyncio.run(main(parser.parse_args()))

"""Engine benchmark: inbound events/s and p50/p99 latency of ``Engine.handle``.

N synthetic events over M subscribers (a /start each, then button presses, free text and
captures of the bundled welcome flow), C subscribers talking at once, on SQLite and, when
reachable, PostgreSQL. In the same run, a baseline does the least any durable engine must
do per event (one transaction with the dedupe insert), so the table shows what the flow
machinery costs on top. Then the delivery worker drains the queued messages (console
channel, no network) and the rate of that is printed too.

    .venv/bin/python bench/engine.py [--events 5000] [--subscribers 500] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.harness import drop_postgres, postgres_database, write_report  # noqa: E402
from bot_platform.clock import ManualClock  # noqa: E402
from bot_platform.config import Settings, WorkerSettings  # noqa: E402
from bot_platform.database import insert_ignore  # noqa: E402
from bot_platform.models import ProcessedEvent  # noqa: E402
from bot_platform.platform import Platform  # noqa: E402
from bot_platform.types import Inbound, InboundKind, Profile  # noqa: E402
from bots.console import ConsoleChannel  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def script(subscribers: int, events: int, seed: int = 7) -> list[list[Inbound]]:
    """Per subscriber, the ordered events it sends."""
    rng = random.Random(seed)
    per_user: list[list[Inbound]] = []
    lines = ["1", "2", "hello there", "not-an-email", "me@example.com", "/start"]
    for n in range(subscribers):
        user = f"bench-{n}"
        profile = Profile(first_name=f"User{n}", language=rng.choice(["en", "uk", "pl", "ar"]))
        per_user.append([Inbound(channel="console", bot_id="console", user_id=user,
                                 event_id=uuid.uuid4().hex, kind=InboundKind.START,
                                 profile=profile)])
    for i in range(max(0, events - subscribers)):
        queue = per_user[i % subscribers]
        line = rng.choice(lines)
        first = queue[0]
        if line.isdigit():
            payload = f"f:welcome:greeting:b{int(line) - 1}"
            event = Inbound(channel="console", bot_id="console", user_id=first.user_id,
                            event_id=uuid.uuid4().hex, kind=InboundKind.BUTTON,
                            payload=payload, profile=first.profile)
        elif line == "/start":
            event = first.model_copy(update={"event_id": uuid.uuid4().hex})
        else:
            event = Inbound(channel="console", bot_id="console", user_id=first.user_id,
                            event_id=uuid.uuid4().hex, kind=InboundKind.TEXT, text=line,
                            profile=first.profile)
        queue.append(event)
    return per_user


async def run_users(per_user: list[list[Inbound]], concurrency: int, handle) -> list[float]:
    """Each subscriber's events in order; ``concurrency`` subscribers at once."""
    latencies: list[float] = []
    pending = list(range(len(per_user)))

    async def talker() -> None:
        while pending:
            events = per_user[pending.pop()]
            for event in events:
                start = time.perf_counter()
                await handle(event)
                latencies.append(time.perf_counter() - start)

    await asyncio.gather(*(talker() for _ in range(concurrency)))
    return latencies


async def console_platform(url: str) -> Platform:
    """A started platform on a migrated ``url`` whose console channel prints nothing."""
    from bot_platform.migrations import upgrade

    await asyncio.to_thread(upgrade, url)
    settings = Settings(_env_file=None, database_url=url, flows_dir=ROOT / "flows",
                        locales_dir=ROOT / "locales",
                        worker=WorkerSettings(batch_size=500, concurrency=64))
    console = ConsoleChannel("console", output=lambda user, text: None)
    platform = Platform(settings, clock=ManualClock(datetime.now(UTC)),
                        channel_overrides={("console", "console"): console})
    await platform.start()
    return platform


async def bench_backend(name: str, url: str, args: argparse.Namespace) -> dict:
    platform = await console_platform(url)
    try:
        per_user = script(args.subscribers, args.events)
        total = sum(len(events) for events in per_user)
        started = time.perf_counter()
        latencies = await run_users(per_user, args.concurrency, platform.engine.handle)
        engine_seconds = time.perf_counter() - started

        async def bare(event: Inbound) -> None:
            async with platform.db.session() as session:
                await session.execute(insert_ignore(session, ProcessedEvent).values(
                    channel="baseline", bot_id="b", event_id=event.event_id,
                    processed_at=datetime.now(UTC)))

        started = time.perf_counter()
        base_latencies = await run_users(per_user, args.concurrency, bare)
        base_seconds = time.perf_counter() - started

        started = time.perf_counter()
        delivered = await platform.drain()
        drain_seconds = time.perf_counter() - started
    finally:
        await platform.close()
    return {
        "backend": name, "events": total, "subscribers": args.subscribers,
        "concurrency": args.concurrency,
        "events_per_s": total / engine_seconds,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "baseline_events_per_s": total / base_seconds,
        "baseline_p50_ms": statistics.median(base_latencies) * 1000,
        "baseline_p99_ms": percentile(base_latencies, 0.99) * 1000,
        "delivered": delivered, "deliveries_per_s": delivered / drain_seconds,
    }


async def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--subscribers", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "engine.json"))
    args = parser.parse_args()

    results = []
    with tempfile.TemporaryDirectory() as folder:
        results.append(await bench_backend(
            "sqlite", f"sqlite+aiosqlite:///{folder}/bench.sqlite3", args))
    if not args.no_postgres:
        url = await postgres_database()
        if url:
            try:
                results.append(await bench_backend("postgresql", url, args))
            finally:
                await drop_postgres(url)

    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    header = (f"{'backend':<11} {'events':>7} {'events/s':>9} {'p50 ms':>7} {'p99 ms':>7} "
              f"{'baseline/s':>11} {'engine/base':>11} {'deliveries/s':>13}")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['backend']:<11} {r['events']:>7} {r['events_per_s']:>9.0f} "
              f"{r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f} {r['baseline_events_per_s']:>11.0f} "
              f"{r['events_per_s'] / r['baseline_events_per_s']:>11.2f} "
              f"{r['deliveries_per_s']:>13.0f}")
    print(f"peak RSS: {peak_rss_mb:.0f} MB; {args.subscribers} subscribers, "
          f"{args.concurrency} talking at once; baseline = one transaction with the dedupe "
          f"insert per event")
    return {"path": args.json, "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": os.uname().nodename, "cpus": os.cpu_count(),
            "peak_rss_mb": peak_rss_mb, "results": results}


if __name__ == "__main__":
    write_report(asyncio.run(main()))

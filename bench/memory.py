"""Memory and segment benchmark at scale: a ``botp worker``'s peak RSS while N subscribers
exist and it works across them, and the segment preview count time on PostgreSQL.

N subscribers (default 1,000,000) with their contacts, tags, attributes and order events
are COPYed into a fresh PostgreSQL database (varied channels, locales, statuses, sign-up
and last-message times, so filters have something to do). Then:

  (b) segment previews: ``POST /api/segments/preview`` through the real app (a marketer's
      key) for a few realistic filters, median of 3 runs each, with the machine quiet;
      also the bare ``count(*)`` the endpoint runs, to separate it from the sample;
  (a) a broadcast to a sizeable segment is started through the admin API (its recipients
      snapshotted in the request), the daily win-back scan is made due now, and one
      ``botp worker`` runs for ``--seconds`` (Telegram and Viber fakes, the console bot on
      the relay fake), its RSS sampled every 0.5 s. Reported: peak RSS (VmHWM) and the
      work done (scans, broadcast batches queued, messages sent).

The baseline measured in the same run is the same worker idle on the same database before
any work is due, so the table shows what the work adds to the worker's memory. With
``--sqlite-subscribers`` (default 100,000; 0 skips it) the previews are also timed on
SQLite at that size.

    .venv/bin/python bench/memory.py [--subscribers 1000000] [--seconds 90]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from sqlalchemy import func, select, text, update  # noqa: E402

from bench.harness import drop_postgres, postgres_database, write_report  # noqa: E402
from bench.scheduler import Workers, autoanalyze, cpu_seconds, proc_status  # noqa: E402
from bot_platform.apikeys import create_key  # noqa: E402
from bot_platform.clock import SystemClock  # noqa: E402
from bot_platform.config import BotConfig, Settings  # noqa: E402
from bot_platform.models import Job, Outbox, Subscriber  # noqa: E402
from bot_platform.platform import Platform  # noqa: E402
from bot_platform.segments import Filter, compile_filter  # noqa: E402
from bot_platform.winback import SCAN_KIND  # noqa: E402
from tests.fakes.relay import FakeRelayServer  # noqa: E402
from tests.fakes.telegram_api import FakeTelegramServer  # noqa: E402
from tests.fakes.viber_api import FakeViberServer  # noqa: E402

CHUNK = 100_000  # rows generated and copied at a time
VIBER_TOKEN = "bench-viber-token"
CHANNELS = [("telegram", "tg", 0.60), ("viber", "vb", 0.25), ("console", "console", 0.15)]
LOCALES = [("en", 0.45), ("uk", 0.30), ("pl", 0.15), ("ar", 0.10)]
CITIES = ["Kyiv", "Lviv", "Warsaw", "Krakow", "Dubai", "Odesa", "Berlin"]
ZONES = ["Europe/Kyiv", "Europe/Warsaw", "Asia/Dubai", "UTC"]
TAGS = [("vip", 0.05), ("quiz-done", 0.15), ("blocked", 0.01), ("newsletter", 0.30)]
FILTERS: list[tuple[str, dict[str, Any]]] = [
    ("channel + locale", {"all": [{"channel": "telegram"}, {"locale": "uk"}]}),
    ("tag", {"tag": "vip"}),
    ("active 30-90 days ago", {"last_active": {"within_days": 90, "before_days": 30}}),
    ("attribute city", {"attribute": "city", "op": "eq", "value": "Kyiv"}),
    ("attribute age >= 40", {"attribute": "age", "op": "gte", "value": 40}),
    ("2+ orders in 90 days", {"event": {"name": "order_placed", "min_count": 2,
                                        "within_days": 90}}),
    ("rfm champions", {"rfm": "champions"}),
    ("combined", {"all": [{"status": "subscribed"}, {"channel": "viber"},
                          {"last_active": {"within_days": 30}},
                          {"not": {"any": [{"tag": "blocked"}, {"tag": "vip"}]}}]}),
]
BROADCAST_SEGMENT = {"all": [{"locale": "en"}, {"not": {"channel": "console"}}]}


def pick(rng: random.Random, weighted: list[tuple[Any, ...]]) -> tuple[Any, ...]:
    """One of ``weighted`` (its last element is its share)."""
    roll, edge = rng.random(), 0.0
    for item in weighted:
        edge += item[-1]
        if roll < edge:
            return item
    return weighted[-1]


# ---- the population -------------------------------------------------------------------


def population(first: int, last: int, now: datetime, seed: int = 11
               ) -> Iterator[dict[str, list[tuple[Any, ...]]]]:
    """Rows for subscribers ``first..last`` (and their contacts, tags and order events)
    in chunks, as tuples in the column order of ``COLUMNS``; times naive UTC."""
    rng = random.Random(seed + first)
    naive_now = now.replace(tzinfo=None)
    for start in range(first, last + 1, CHUNK):
        chunk: dict[str, list[tuple[Any, ...]]] = {
            "contacts": [], "subscribers": [], "subscriber_tags": [], "events": []}
        for i in range(start, min(last + 1, start + CHUNK)):
            created = naive_now - timedelta(days=rng.random() * 730)
            last_in = created + (naive_now - created) * rng.random()
            channel, bot_id, _ = pick(rng, CHANNELS)
            locale = pick(rng, LOCALES)[0]
            user_id = {"telegram": str(1_000_000_000 + i), "viber": f"vb{i:09d}=="}.get(
                channel, f"c{i}")
            email = f"user{i}@example.com" if rng.random() < 0.2 else None
            phone = f"+38050{i:07d}" if rng.random() < 0.1 else None
            attributes: dict[str, Any] = {}
            if rng.random() < 0.5:
                attributes = {"city": rng.choice(CITIES), "age": rng.randint(16, 70),
                              "timezone": rng.choice(ZONES)}
            if email:
                attributes["email"] = email
            status = "subscribed" if rng.random() < 0.95 else "unsubscribed"
            chunk["contacts"].append((i, phone, email, created))
            chunk["subscribers"].append((
                i, i, channel, bot_id, user_id, status, locale, f"User{i}", None, None,
                None, json.dumps(attributes), last_in, created, last_in))
            for tag, share in TAGS:
                if rng.random() < share:
                    chunk["subscriber_tags"].append((i, tag))
            if email:
                chunk["subscriber_tags"].append((i, "has-email"))
            if rng.random() < 0.25:
                for _ in range(rng.randint(1, 6)):
                    moment = naive_now - timedelta(days=rng.random() * 400)
                    chunk["events"].append((
                        None, "order_placed", i, i,
                        json.dumps({"total": round(rng.uniform(5, 300), 2)}), moment, moment))
        yield chunk


COLUMNS = {
    "contacts": ["id", "phone", "email", "created_at"],
    "subscribers": ["id", "contact_id", "channel", "bot_id", "user_id", "status", "locale",
                    "first_name", "last_name", "username", "source_ref", "attributes",
                    "last_inbound_at", "created_at", "updated_at"],
    "subscriber_tags": ["subscriber_id", "tag"],
    "events": ["external_id", "name", "contact_id", "subscriber_id", "data", "occurred_at",
               "created_at"],
}


async def load_postgres(url: str, count: int, now: datetime) -> dict[str, int]:
    """COPY the population in; ids explicit, sequences moved past them, then ANALYZE."""
    import asyncpg

    connection = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    rows = dict.fromkeys(COLUMNS, 0)
    try:
        for chunk in population(1, count, now):
            for table, records in chunk.items():
                await connection.copy_records_to_table(table, records=records,
                                                       columns=COLUMNS[table])
                rows[table] += len(records)
        for table in ("contacts", "subscribers"):
            await connection.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                                     f"(SELECT max(id) FROM {table}))")
        await connection.execute("VACUUM ANALYZE")  # as autovacuum would after a load
    finally:
        await connection.close()
    return rows


def load_sqlite(path: str, count: int, now: datetime) -> dict[str, int]:
    """The same population through sqlite3 (datetimes as SQLAlchemy stores them)."""
    def stamp(value: Any) -> Any:
        return value.strftime("%Y-%m-%d %H:%M:%S.%f") if isinstance(value, datetime) else value

    rows = dict.fromkeys(COLUMNS, 0)
    connection = sqlite3.connect(path)
    try:
        for chunk in population(1, count, now):
            for table, records in chunk.items():
                marks = ", ".join("?" * len(COLUMNS[table]))
                connection.executemany(
                    f"INSERT INTO {table} ({', '.join(COLUMNS[table])}) VALUES ({marks})",
                    [tuple(stamp(v) for v in record) for record in records])
                rows[table] += len(records)
            connection.commit()
        connection.execute("ANALYZE")
        connection.commit()
    finally:
        connection.close()
    return rows


# ---- segment previews -----------------------------------------------------------------


async def time_previews(platform: Platform, client: httpx.AsyncClient, key: str,
                        runs: int = 3) -> list[dict[str, Any]]:
    """Per filter: the endpoint's answer and time, and the bare count's time (medians)."""
    from pydantic import TypeAdapter

    adapter = TypeAdapter(Filter)
    results = []
    for name, body in FILTERS:
        endpoint, counts, count = [], [], None
        for _ in range(runs):
            started = time.perf_counter()
            response = await client.post("/api/segments/preview?sample=10",
                                         headers={"X-API-Key": key}, json={"filter": body})
            endpoint.append(time.perf_counter() - started)
            response.raise_for_status()
            count = response.json()["count"]
        condition = compile_filter(adapter.validate_python(body), now=platform.clock.now(),
                                   dialect=platform.db.dialect)
        query = select(func.count()).select_from(Subscriber).where(condition)
        for _ in range(runs):
            started = time.perf_counter()
            async with platform.db.session() as session:
                await session.scalar(query)
            counts.append(time.perf_counter() - started)
        result = {"filter": name, "body": body, "count": count,
                  "endpoint_ms": statistics.median(endpoint) * 1000,
                  "count_ms": statistics.median(counts) * 1000}
        if platform.db.dialect == "postgresql" and result["count_ms"] > 1000:
            async with platform.db.session() as session:
                compiled = query.compile(dialect=session.bind.dialect,
                                         compile_kwargs={"literal_binds": True})
                plan = (await session.execute(text(f"EXPLAIN ANALYZE {compiled}"))).all()
            result["plan"] = [row[0] for row in plan]
        results.append(result)
        print(f"  {name}: {count} in {result['endpoint_ms']:.0f} ms", file=sys.stderr)
    return results


# ---- the worker -------------------------------------------------------------------------


def bots(telegram: str, viber: str, relay: str) -> list[dict[str, Any]]:
    """The bots of every channel in the population, each at a fake."""
    return [{"id": "tg", "channel": "telegram", "token": "123456:BENCH", "secret": "s",
             "api_base": telegram, "messages_per_second": 1000},
            {"id": "vb", "channel": "viber", "token": VIBER_TOKEN, "api_base": viber},
            {"id": "console", "channel": "console", "api_base": relay}]


def worker_env(url: str, bot_list: list[dict[str, Any]]) -> dict[str, str]:
    """A ``botp worker``'s environment; quiet logs so their volume costs nothing."""
    env = {**os.environ, "BOTP_DATABASE_URL": url, "BOTP_FLOWS_DIR": str(ROOT / "flows"),
           "BOTP_LOCALES_DIR": str(ROOT / "locales"), "BOTP_BOTS": json.dumps(bot_list),
           "BOTP_LOG_LEVEL": "WARNING"}
    env.pop("BOTP_REDIS_URL", None)  # one worker: its own in-memory rate limiter
    return env


async def sample_rss(workers: Workers, seconds: float, label: str) -> dict[str, Any]:
    """Sample the worker's RSS every 0.5 s for ``seconds``; also its CPU time meanwhile."""
    pid = workers.pids[0]
    samples: list[tuple[float, float]] = []
    started, cpu_before = time.monotonic(), cpu_seconds(pid)
    while time.monotonic() - started < seconds:
        workers.check_alive()
        samples.append((time.monotonic() - started, proc_status(pid, "VmRSS") / 2**20))
        if len(samples) % 30 == 0:
            print(f"  {label}: {samples[-1][0]:.0f} s, RSS {samples[-1][1]:.0f} MB",
                  file=sys.stderr)
        await asyncio.sleep(0.5)
    return {"peak_rss_mb": proc_status(pid, "VmHWM") / 2**20,
            "max_sampled_rss_mb": max(rss for _, rss in samples),
            "last_rss_mb": samples[-1][1], "cpu_seconds": cpu_seconds(pid) - cpu_before,
            "samples": [(round(t, 1), round(r, 1)) for t, r in samples]}


async def work_done(platform: Platform, broadcast_id: int) -> dict[str, Any]:
    """What the worker has done so far, from the database."""
    async with platform.db.session() as session:
        jobs = (await session.execute(select(Job.kind, Job.status, Job.result, func.count())
                                      .group_by(Job.kind, Job.status, Job.result))).all()
        outbox = dict((await session.execute(select(Outbox.status, func.count()).group_by(
            Outbox.status))).all())
        recipients = dict((await session.execute(text(
            "SELECT status, count(*) FROM broadcast_recipients WHERE broadcast_id = :b "
            "GROUP BY status"), {"b": broadcast_id})).all())
        winbacks = await session.scalar(text(
            "SELECT count(*) FROM events WHERE name = 'inactive'"))
    return {"jobs": [{"kind": k, "status": s, "result": r, "count": n} for k, s, r, n in jobs],
            "outbox": outbox, "broadcast_recipients": recipients,
            "winback_started": winbacks}


def sent_by_channel(telegram: FakeTelegramServer, viber: FakeViberServer,
                    relay: FakeRelayServer) -> dict[str, int]:
    """Messages the fakes accepted (a Viber broadcast call counts once per receiver)."""
    return {"telegram": len(telegram.sent()),
            "viber": len(viber.sent()) + sum(
                len(c.body.get("broadcast_list") or []) for c in viber.calls
                if c.ok and c.method == "broadcast_message"),
            "console": len(relay.received)}


async def run_postgres(url: str, args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    """Load, time the previews, then the worker idle and at work (RSS sampled)."""
    from bot_platform.migrations import upgrade

    await asyncio.to_thread(upgrade, url)
    now = datetime.now(UTC)
    print(f"postgresql: loading {args.subscribers} subscribers", file=sys.stderr)
    started = time.perf_counter()
    rows = await load_postgres(url, args.subscribers, now)
    load_seconds = time.perf_counter() - started
    print(f"  loaded {rows} in {load_seconds:.0f} s", file=sys.stderr)

    async with FakeTelegramServer() as telegram, FakeViberServer(VIBER_TOKEN) as viber, \
            FakeRelayServer() as relay:
        bot_list = bots(telegram.url, viber.url, relay.url)
        settings = Settings(_env_file=None, database_url=url, flows_dir=ROOT / "flows",
                            locales_dir=ROOT / "locales",
                            bots=[BotConfig.model_validate(b) for b in bot_list])
        platform = Platform(settings, clock=SystemClock())
        await platform.start()
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=platform.app()),
                                   base_url="http://bench", timeout=600)
        workers = Workers(1, worker_env(url, bot_list), log_dir)
        phases: list[dict[str, Any]] = []
        try:
            _, key = await create_key(platform.db, name="bench", role="marketer", now=now)
            headers = {"X-API-Key": key}
            print("postgresql: segment previews", file=sys.stderr)
            previews = await time_previews(platform, client, key)

            async with autoanalyze(url, args.analyze_every) as analyzing:
                # Nothing due yet (the scan waits a day): the idle worker is the baseline.
                await scan_due(platform, now + timedelta(days=1))
                workers.start()
                idle = await sample_rss(workers, args.idle_seconds, "idle worker")

                created = await client.post("/api/broadcasts", headers=headers, json={
                    "name": "bench", "filter": BROADCAST_SEGMENT, "variants": [
                        {"name": "A", "percent": 50, "messages": {
                            "en": {"text": "Spring sale: -20% on everything",
                                   "buttons": [{"title": "Shop",
                                                "url": "https://shop.example.com/sale"}]}}},
                        {"name": "B", "percent": 50, "messages": {
                            "en": {"text": "Our spring picks for you"}}}]})
                created.raise_for_status()
                broadcast_id = created.json()["id"]
                rss_before = proc_status(os.getpid(), "VmRSS")
                started = time.perf_counter()
                response = await client.post(f"/api/broadcasts/{broadcast_id}/start",
                                             headers=headers)
                response.raise_for_status()
                start_seconds = time.perf_counter() - started
                start_rss_growth = (proc_status(os.getpid(), "VmRSS") - rss_before) / 2**20
                async with platform.db.session() as session:
                    recipients = await session.scalar(text(
                        "SELECT count(*) FROM broadcast_recipients WHERE broadcast_id = :b"),
                        {"b": broadcast_id})
                print(f"  broadcast to {recipients} started in {start_seconds:.1f} s",
                      file=sys.stderr)
                half = args.seconds / 2
                phases.append({"name": "broadcast", **await sample_rss(workers, half, "broadcast"),
                               "work": await work_done(platform, broadcast_id),
                               "sent": sent_by_channel(telegram, viber, relay)})
                await scan_due(platform, platform.clock.now())
                phases.append({"name": "broadcast + win-back scan",
                               **await sample_rss(workers, half, "broadcast + win-back scan"),
                               "work": await work_done(platform, broadcast_id),
                               "sent": sent_by_channel(telegram, viber, relay)})
                errors = workers.errors()
        finally:
            workers.stop()
            await client.aclose()
            await platform.close()
    return {"backend": "postgresql", "subscribers": args.subscribers, "rows": rows,
            "load_seconds": load_seconds, "previews": previews,
            "broadcast": {"segment": BROADCAST_SEGMENT, "recipients": recipients,
                          "start_seconds": start_seconds,
                          "start_rss_growth_of_api_process_mb": start_rss_growth},
            "idle_worker": idle, "phases": phases,
            "peak_rss_mb": phases[-1]["peak_rss_mb"], "worker_errors_logged": errors,
            "autovacuum": analyzing["autovacuum"], "bench_analyzes": analyzing["analyzed"],
            "seconds": args.seconds}


async def scan_due(platform: Platform, when: datetime) -> None:
    """Move the pending win-back scan (``ensure_scan`` adds one at start-up) to ``when``."""
    async with platform.db.session() as session:
        moved = await session.execute(update(Job).where(
            Job.kind == SCAN_KIND, Job.status == "pending").values(due_at=when))
        if moved.rowcount == 0:
            session.add(Job(kind=SCAN_KIND, due_at=when, created_at=when, payload={}))


async def run_sqlite(folder: str, count: int) -> dict[str, Any]:
    """The previews on SQLite at a smaller size (the embedded deployment)."""
    from bot_platform.migrations import upgrade

    path = f"{folder}/memory.sqlite3"
    url = f"sqlite+aiosqlite:///{path}"
    await asyncio.to_thread(upgrade, url)
    now = datetime.now(UTC)
    print(f"sqlite: loading {count} subscribers", file=sys.stderr)
    started = time.perf_counter()
    rows = await asyncio.to_thread(load_sqlite, path, count, now)
    load_seconds = time.perf_counter() - started
    settings = Settings(_env_file=None, database_url=url, flows_dir=ROOT / "flows",
                        locales_dir=ROOT / "locales")
    platform = Platform(settings, clock=SystemClock())
    await platform.start()
    try:
        _, key = await create_key(platform.db, name="bench", role="marketer", now=now)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=platform.app()),
                                     base_url="http://bench", timeout=300) as client:
            previews = await time_previews(platform, client, key)
    finally:
        await platform.close()
    return {"backend": "sqlite", "subscribers": count, "rows": rows,
            "load_seconds": load_seconds, "previews": previews}


async def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subscribers", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=90.0,
                        help="how long the worker works while its RSS is sampled")
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--analyze-every", type=float, default=20.0,
                        help="on a server with autovacuum off, ANALYZE changed tables this "
                             "often (s) as autovacuum would (0: never)")
    parser.add_argument("--sqlite-subscribers", type=int, default=100_000,
                        help="also time the previews on SQLite at this size (0: skip)")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "memory.json"))
    args = parser.parse_args()

    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    results = []
    with tempfile.TemporaryDirectory() as folder:
        url = await postgres_database()
        if url is not None:
            try:
                results.append(await run_postgres(url, args, Path(folder)))
            finally:
                await drop_postgres(url)
        if args.sqlite_subscribers:
            results.append(await run_sqlite(folder, args.sqlite_subscribers))

    for r in results:
        print(f"\n{r['backend']}, {r['subscribers']:,} subscribers (loaded in "
              f"{r['load_seconds']:.0f} s): segment preview, median of 3")
        print(f"  {'filter':<24} {'count':>9} {'endpoint ms':>12} {'count ms':>9}")
        for p in r["previews"]:
            print(f"  {p['filter']:<24} {p['count']:>9} {p['endpoint_ms']:>12.0f} "
                  f"{p['count_ms']:>9.0f}")
        if "phases" not in r:
            continue
        idle, b = r["idle_worker"], r["broadcast"]
        print(f"\n  broadcast: {b['recipients']} recipients ({json.dumps(b['segment'])}) "
              f"snapshotted by POST /start in {b['start_seconds']:.1f} s (API process RSS "
              f"+{b['start_rss_growth_of_api_process_mb']:.0f} MB)")
        print(f"  {'worker phase':<28} {'seconds':>7} {'max RSS MB':>10} {'CPU s':>6} "
              f"{'bc queued':>9} {'win-backs':>9} {'sent':>7}")
        print(f"  {'idle (baseline)':<28} {args.idle_seconds:>7.0f} "
              f"{idle['max_sampled_rss_mb']:>10.0f} {idle['cpu_seconds']:>6.0f}")
        before: dict[str, Any] = {"queued": 0, "winbacks": 0, "sent": 0}
        for phase in r["phases"]:
            work = phase["work"]
            now_counts = {"queued": work["broadcast_recipients"].get("queued", 0),
                          "winbacks": work["winback_started"],
                          "sent": sum(phase["sent"].values())}
            print(f"  {phase['name']:<28} {args.seconds / 2:>7.0f} "
                  f"{phase['max_sampled_rss_mb']:>10.0f} {phase['cpu_seconds']:>6.0f} "
                  f"{now_counts['queued'] - before['queued']:>9} "
                  f"{now_counts['winbacks'] - before['winbacks']:>9} "
                  f"{now_counts['sent'] - before['sent']:>7}")
            before = now_counts
        last = r["phases"][-1]
        print(f"  worker peak RSS (VmHWM): {r['peak_rss_mb']:.0f} MB; outbox "
              f"{last['work']['outbox']}; sent per channel {last['sent']}")
        if r["autovacuum"] == "off":
            print(f"  the server runs with autovacuum off: the bench ran ANALYZE "
                  f"{r['bench_analyzes']} times, as autovacuum would (--analyze-every)")
    print(f"\ntotal {time.perf_counter() - started:.0f} s; load average at the end "
          f"{os.getloadavg()[0]:.1f} (at the start {load_at_start:.1f}) on {os.cpu_count()} "
          f"CPUs: other processes share the machine when it is above the bench's own")
    return {"path": args.json, "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": os.uname().nodename, "cpus": os.cpu_count(),
            "load_average": {"start": load_at_start, "end": os.getloadavg()[0]},
            "args": {k: v for k, v in vars(args).items() if k != "json"}, "results": results}


if __name__ == "__main__":
    write_report(asyncio.run(main()))

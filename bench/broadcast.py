"""Broadcast benchmark: N recipients on the Telegram fake, which enforces a limit of L
messages/s (answering 429 beyond it); the platform is configured to send at L. Prints the
achieved send rate as a fraction of L, the 429s provoked and peak RSS, on SQLite (and on
PostgreSQL when reachable).

    .venv/bin/python bench/broadcast.py --recipients 100000 --limit 1000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import insert, select  # noqa: E402

from bench.engine import drop_postgres, postgres_database  # noqa: E402
from bot_platform import broadcasts  # noqa: E402
from bot_platform.clock import SystemClock  # noqa: E402
from bot_platform.config import BotConfig, Settings, WorkerSettings  # noqa: E402
from bot_platform.models import Broadcast, Contact, Subscriber  # noqa: E402
from bot_platform.platform import Platform  # noqa: E402
from tests.fakes.telegram_api import FakeTelegramServer  # noqa: E402


async def run(name: str, url: str, recipients: int, limit: int) -> dict:
    from bot_platform.migrations import upgrade

    await asyncio.to_thread(upgrade, url)
    async with FakeTelegramServer() as fake:
        fake.rate_limit(per_second=limit, retry_after=1)
        settings = Settings(
            _env_file=None, database_url=url, flows_dir=ROOT / "flows",
            locales_dir=ROOT / "locales",
            bots=[BotConfig(id="tg", channel="telegram", token="123456:ABC", secret="s",
                            api_base=fake.url, messages_per_second=limit)],
            worker=WorkerSettings(batch_size=1000, concurrency=128, poll_interval=0.05))
        platform = Platform(settings, clock=SystemClock())
        await platform.start()
        try:
            now = platform.clock.now()
            async with platform.db.session() as session:
                for first in range(0, recipients, 10000):
                    count = min(10000, recipients - first)
                    await session.execute(insert(Contact), [{"created_at": now}] * count)
                contact_ids = (await session.scalars(select(Contact.id))).all()
                rows = [{"contact_id": c, "channel": "telegram", "bot_id": "tg",
                         "user_id": str(1_000_000 + n), "status": "subscribed",
                         "locale": "en", "attributes": {}, "last_inbound_at": now,
                         "created_at": now, "updated_at": now}
                        for n, c in enumerate(contact_ids)]
                for first in range(0, len(rows), 10000):
                    await session.execute(insert(Subscriber), rows[first:first + 10000])
                broadcast = await broadcasts.create(session, broadcasts.BroadcastCreate(
                    name="bench", filter={"channel": "telegram"}, variants=[{
                        "name": "A", "percent": 100,
                        "messages": {"en": {"text": "Spring sale!"}}}]), now)
                broadcast_id = broadcast.id
            started = time.perf_counter()
            async with platform.db.session() as session:
                await broadcasts.start(session, await session.get(Broadcast, broadcast_id),
                                       platform.clock.now())
            await platform.drain()
            while len(fake.sent()) < recipients and time.perf_counter() - started < 900:
                await asyncio.sleep(0.5)
                await platform.drain()
            seconds = time.perf_counter() - started
        finally:
            await platform.close()
        sent = len(fake.sent())
        return {"backend": name, "recipients": recipients, "limit": limit, "sent": sent,
                "seconds": seconds, "rate": sent / seconds,
                "fraction_of_limit": sent / seconds / limit,
                "too_many_requests": fake.too_many_requests}


async def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipients", type=int, default=100_000)
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "broadcast.json"))
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as folder:
        results.append(await run("sqlite", f"sqlite+aiosqlite:///{folder}/b.sqlite3",
                                 args.recipients, args.limit))
    if not args.no_postgres:
        url = await postgres_database()
        if url:
            try:
                results.append(await run("postgresql", url, args.recipients, args.limit))
            finally:
                await drop_postgres(url)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{'backend':<11} {'recipients':>10} {'limit/s':>8} {'sent':>8} {'seconds':>8} "
          f"{'sent/s':>8} {'of limit':>9} {'429s':>6}")
    for r in results:
        print(f"{r['backend']:<11} {r['recipients']:>10} {r['limit']:>8} {r['sent']:>8} "
              f"{r['seconds']:>8.1f} {r['rate']:>8.0f} {r['fraction_of_limit']:>9.2f} "
              f"{r['too_many_requests']:>6}")
    print(f"peak RSS (platform and fake in one process): {peak:.0f} MB")
    return {"path": args.json, "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": os.uname().nodename, "peak_rss_mb": peak, "results": results,
            "run": uuid.uuid4().hex[:8]}


if __name__ == "__main__":
    report = asyncio.run(main())
    path = Path(report.pop("path"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))

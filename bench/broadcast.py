"""Broadcast benchmark: N recipients through ``botp worker`` processes to the Telegram fake
(in its own process), which answers 429 beyond L messages/s; the bot is configured to L.
Prints the achieved rate as a fraction of L, the 429s provoked, recipients reached twice
and each worker's peak RSS, for: SQLite with one worker, PostgreSQL with one worker, and
PostgreSQL with three workers sharing the Redis rate limiter. The baseline, in the same
run: aiogram alone sending the same messages to the same fake at the same planned rate,
with no database at all: the most this machine and fake allow.

    .venv/bin/python bench/broadcast.py [--recipients 100000] [--limit 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
from sqlalchemy import insert, select  # noqa: E402

from bench.harness import (  # noqa: E402
    REDIS_URL,
    FakeTelegram,
    Processes,
    botp_env,
    drop_postgres,
    postgres_database,
    redis_available,
    write_report,
)
from bench.scheduler import cpu_seconds  # noqa: E402
from bot_platform import broadcasts  # noqa: E402
from bot_platform.database import Database  # noqa: E402
from bot_platform.migrations import upgrade  # noqa: E402
from bot_platform.models import Contact, Subscriber  # noqa: E402

TOKEN = "123456:ABC"
TEXT = "Spring sale: -20% on everything today"


async def populate(url: str, recipients: int) -> int:
    """N subscribers in bulk and a broadcast to all of them (a draft); its id."""
    db = Database(url)
    now = datetime.now(UTC)
    try:
        async with db.session() as session:
            for first in range(0, recipients, 10_000):
                count = min(10_000, recipients - first)
                await session.execute(insert(Contact), [{"created_at": now}] * count)
            contact_ids = (await session.scalars(select(Contact.id).order_by(Contact.id))).all()
            rows = [{"contact_id": c, "channel": "telegram", "bot_id": "tg",
                     "user_id": str(1_000_000 + n), "status": "subscribed", "locale": "en",
                     "attributes": {}, "last_inbound_at": now, "created_at": now,
                     "updated_at": now} for n, c in enumerate(contact_ids)]
            for first in range(0, len(rows), 10_000):
                await session.execute(insert(Subscriber), rows[first:first + 10_000])
            broadcast = await broadcasts.create(session, broadcasts.BroadcastCreate(
                name="bench", filter={"channel": "telegram"}, variants=[{
                    "name": "A", "percent": 100, "messages": {"en": {"text": TEXT}}}]), now)
            return broadcast.id
    finally:
        await db.close()


async def start_broadcast(url: str, broadcast_id: int) -> None:
    db = Database(url)
    try:
        async with db.session() as session:
            await broadcasts.start(session, broadcast_id, datetime.now(UTC))
    finally:
        await db.close()


async def run_setup(name: str, url: str, workers: int, args: argparse.Namespace,
                    folder: Path) -> dict[str, Any]:
    await asyncio.to_thread(upgrade, url)
    broadcast_id = await populate(url, args.recipients)
    with Processes(folder / name) as processes:
        (folder / name).mkdir(parents=True, exist_ok=True)
        fake = FakeTelegram(processes, limit=args.limit)
        bots = [{"id": "tg", "channel": "telegram", "token": TOKEN, "secret": "s",
                 "api_base": fake.url, "messages_per_second": args.limit}]
        settings: dict[str, Any] = {
            "bots": json.dumps(bots), "worker__batch_size": args.batch,
            "worker__concurrency": args.concurrency, "worker__poll_interval": 0.05}
        if url.startswith("postgresql"):
            settings["redis_url"] = REDIS_URL
        env = botp_env(url, **settings)
        async with aiohttp.ClientSession() as http:
            await fake.ready(http)
            started_workers = [processes.botp(f"worker{n}", "worker", env)
                               for n in range(workers)]
            await asyncio.sleep(3)  # start-up: imports, flows, connections
            started = time.time()
            cpu_before = sum(cpu_seconds(w.popen.pid) for w in started_workers)
            await start_broadcast(url, broadcast_id)
            stats = await fake.stats(http)
            while stats["ok"] < args.recipients and time.time() - started < args.deadline:
                await asyncio.sleep(0.5)
                processes.sample()
                stats = await fake.stats(http)
            cpu = sum(cpu_seconds(w.popen.pid) for w in started_workers) - cpu_before
            for worker in started_workers:
                worker.stop()
        problems = sum(len(w.problems()) for w in started_workers)
    sustained = stats["ok"] / max(1e-9, stats["last_ok"] - stats["first_ok"])
    return {
        "per_second": stats["per_second"],
        "setup": name, "workers": workers, "recipients": args.recipients, "limit": args.limit,
        "sent": stats["ok"], "seconds": stats["last_ok"] - started,
        "rate": sustained, "fraction_of_limit": sustained / args.limit,
        "end_to_end_rate": stats["ok"] / max(1e-9, stats["last_ok"] - started),
        "too_many_requests": stats["too_many_requests"], "doubled": stats["doubled"],
        "worker_peak_rss_mb": max(w.peak_mb for w in started_workers),
        "log_problems": problems, "finished": stats["ok"] >= args.recipients,
        "worker_cpu_seconds": cpu, "cpu_ms_per_send": 1000 * cpu / max(1, stats["ok"]),
    }


async def baseline(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """aiogram alone: the same sends, paced by the same limiter, no database."""
    from aiogram import Bot
    from aiogram.client.session.aiohttp import AiohttpSession
    from aiogram.client.telegram import TelegramAPIServer
    from aiogram.exceptions import TelegramRetryAfter

    from bot_platform.delivery import SEND_HEADROOM
    from bot_platform.ratelimit import Limits, MemoryRateLimiter, Pacer

    count = min(args.recipients, args.limit * 20)
    with Processes(folder / "baseline") as processes:
        (folder / "baseline").mkdir(parents=True, exist_ok=True)
        fake = FakeTelegram(processes, limit=args.limit)
        async with aiohttp.ClientSession() as http:
            await fake.ready(http)
            session = AiohttpSession(api=TelegramAPIServer.from_base(fake.url))
            bot = Bot(TOKEN, session=session)
            limiter = MemoryRateLimiter()
            pacer = Pacer(limiter)
            limits = Limits(per_bot=args.limit * SEND_HEADROOM, per_chat=math.inf)
            chats = iter(range(2_000_000, 2_000_000 + count))
            started = time.time()

            async def sender() -> None:
                for chat in chats:
                    while True:
                        await pacer.wait("tg", "*", limits, 60)
                        try:
                            await bot.send_message(chat, TEXT)
                            break
                        except TelegramRetryAfter as error:  # counted by the fake
                            await limiter.pause("tg", error.retry_after)

            try:
                await asyncio.gather(*(sender() for _ in range(128)))
            finally:
                await session.close()
            stats = await fake.stats(http)
    sustained = stats["ok"] / max(1e-9, stats["last_ok"] - stats["first_ok"])
    return {"setup": "baseline: aiogram, no database", "workers": 0, "recipients": count,
            "limit": args.limit, "sent": stats["ok"], "seconds": stats["last_ok"] - started,
            "rate": sustained, "fraction_of_limit": sustained / args.limit,
            "end_to_end_rate": sustained, "too_many_requests": stats["too_many_requests"],
            "doubled": stats["doubled"], "worker_peak_rss_mb": 0.0, "log_problems": 0,
            "finished": True, "cpu_ms_per_send": None}


def cpu_ms(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


async def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipients", type=int, default=100_000)
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--deadline", type=float, default=150,
                        help="seconds per setup before it is cut off (and reported so)")
    parser.add_argument("--setups", default="baseline,sqlite,postgresql,postgresql-3",
                        help="comma-separated: baseline, sqlite, postgresql, postgresql-3")
    parser.add_argument("--concurrency", type=int, default=128, help="sends in flight/worker")
    parser.add_argument("--batch", type=int, default=1000, help="rows held per worker")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "broadcast.json"))
    args = parser.parse_args()
    wanted = args.setups.split(",")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if "baseline" in wanted:
            results.append(await baseline(args, folder))
        if "sqlite" in wanted:
            results.append(await run_setup(
                "sqlite", f"sqlite+aiosqlite:///{folder}/b.sqlite3", 1, args, folder))
        for name, workers in (("postgresql", 1), ("postgresql-3", 3)):
            if name not in wanted:
                continue
            url = await postgres_database()
            if url is None or not await redis_available():
                continue
            try:
                results.append(await run_setup(name, url, workers, args, folder))
            finally:
                await drop_postgres(url)
    print(f"{'setup':<31} {'sent':>7} {'seconds':>8} {'sent/s':>7} {'of limit':>8} "
          f"{'429s':>5} {'twice':>5} {'worker RSS':>10} {'CPU ms/send':>11}")
    for r in results:
        cut = "" if r["finished"] else "  (cut off at the deadline)"
        print(f"{r['setup']:<31} {r['sent']:>7} {r['seconds']:>8.1f} {r['rate']:>7.0f} "
              f"{r['fraction_of_limit']:>8.2f} {r['too_many_requests']:>5} {r['doubled']:>5} "
              f"{r['worker_peak_rss_mb']:>8.0f}MB {cpu_ms(r['cpu_ms_per_send']):>11}{cut}")
    print(f"limit {args.limit}/s (the fake answers 429 beyond it); sent/s is sustained "
          f"(first to last send); recipients {args.recipients}; CPU ms/send: the workers' "
          f"CPU seconds from the broadcast's start to its last send, per send")
    return {"path": args.json, "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": os.uname().nodename, "cpus": os.cpu_count(), "results": results}


if __name__ == "__main__":
    write_report(asyncio.run(main()))

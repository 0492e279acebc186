"""CPU per queued recipient of a broadcast's send jobs, in-process: a measure a shared
machine skews far less than ``bench/broadcast.py``'s sends/s.

The population of ``bench/broadcast.py`` (N subscribers, a broadcast to all of them,
started: its recipients snapshotted), then one ``Scheduler.run_once`` after another in
this process until the broadcast is completed, with no delivery beside it: only the send
jobs' queueing (recipients -> outbox rows). Prints process CPU and the event loop
thread's CPU per queued recipient, and on PostgreSQL the CPU of the database's backends.

    .venv/bin/python bench/sendjob_cpu.py [--recipients 30000] [--batch 500]
        [--backend sqlite|postgresql] [--profile FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.broadcast import TOKEN, populate, start_broadcast  # noqa: E402
from bench.harness import on_database, run_until_idle  # noqa: E402
from bench.scheduler_cpu import server_cpu  # noqa: E402
from bot_platform.clock import SystemClock  # noqa: E402
from bot_platform.config import BotConfig, Settings  # noqa: E402
from bot_platform.database import Database  # noqa: E402
from bot_platform.platform import Platform  # noqa: E402


async def run(url: str, args: argparse.Namespace) -> None:
    from sqlalchemy import func, select

    from bot_platform import broadcasts
    from bot_platform.migrations import upgrade
    from bot_platform.models import Broadcast, Outbox

    broadcasts.BATCH = args.batch  # RELAXED_BATCH: the batches while people talk
    await asyncio.to_thread(upgrade, url)
    broadcast_id = await populate(url, args.recipients)
    await start_broadcast(url, broadcast_id)
    db = Database(url)
    settings = Settings(_env_file=None, database_url=url, flows_dir=ROOT / "flows",
                        locales_dir=ROOT / "locales", log_level="WARNING",
                        bots=[BotConfig(id="tg", channel="telegram", token=TOKEN,
                                        secret="s", api_base="http://127.0.0.1:9")])
    platform = Platform(settings, clock=SystemClock())
    await platform.start()
    try:
        scheduler = platform.worker.scheduler
        gc.collect()
        gc.freeze()
        server = await server_cpu(db) if not db.is_sqlite else {}
        rounds, cpu, loop, wall = await run_until_idle(scheduler, args.profile)
        async with db.session() as session:
            status = await session.scalar(select(Broadcast.status).where(
                Broadcast.id == broadcast_id))
            queued = await session.scalar(select(func.count()).select_from(Outbox).where(
                Outbox.broadcast_id == broadcast_id))
        if not db.is_sqlite:
            after = await server_cpu(db)
            used = sum(after[pid] - server.get(pid, 0.0) for pid in after)
            print(f"  server CPU {1000 * used / max(1, queued):.4f} ms/recipient")
        print(f"{db.dialect}: {queued} queued ({status}) in {rounds} rounds: process CPU "
              f"{1000 * cpu / max(queued, 1):.4f} ms/recipient, loop thread "
              f"{1000 * loop / max(queued, 1):.4f} ms/recipient, {queued / wall:.0f}/s")
    finally:
        await platform.close()
        await db.close()


async def main(args: argparse.Namespace) -> None:
    await on_database(args.backend, lambda url: run(url, args))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipients", type=int, default=30_000)
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--batch", type=int, default=500, help="recipients a send job")
    parser.add_argument("--profile", help="cProfile the send jobs into this file")
    asyncio.run(main(parser.parse_args()))

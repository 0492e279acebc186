"""CPU per inbound event and per delivered message, in-process (no HTTP): a measure that a
shared machine skews far less than events/s.

``bench/engine.py``'s script (a /start each, then buttons, free text and captures of the
bundled welcome flow), ``--concurrency`` subscribers talking at once through
``Engine.handle`` on SQLite, then the delivery worker draining the queued messages
(console channel). Prints process CPU (all threads, aiosqlite's included) and the event
loop thread's CPU per event, and process CPU per delivered message.

    .venv/bin/python bench/engine_cpu.py [--events 3000] [--subscribers 300]
        [--concurrency 32] [--profile FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.engine import console_platform, run_users, script  # noqa: E402


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as folder:
        platform = await console_platform(f"sqlite+aiosqlite:///{folder}/bench.sqlite3")
        try:
            per_user = script(args.subscribers, args.events)
            total = sum(len(events) for events in per_user)
            gc.collect()
            gc.freeze()
            profile = None
            if args.profile:
                import cProfile

                profile = cProfile.Profile()
                profile.enable()
            cpu, loop, wall = time.process_time(), time.thread_time(), time.perf_counter()
            await run_users(per_user, args.concurrency, platform.engine.handle)
            cpu, loop, wall = (time.process_time() - cpu, time.thread_time() - loop,
                               time.perf_counter() - wall)
            if profile is not None:
                profile.disable()
                profile.dump_stats(args.profile)
            groups = getattr(getattr(platform.engine, "groups", None), "groups", None)
            print(f"events {total}: process CPU {1000 * cpu / total:.3f} ms/event, loop "
                  f"thread {1000 * loop / total:.3f} ms/event, {total / wall:.0f}/s, "
                  f"transactions (group commits) {groups}")
            cpu, wall = time.process_time(), time.perf_counter()
            delivered = await platform.drain()
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            print(f"delivered {delivered}: process CPU "
                  f"{1000 * cpu / max(delivered, 1):.3f} ms/message, "
                  f"{delivered / wall:.0f}/s")
        finally:
            await platform.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=3000)
    parser.add_argument("--subscribers", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--profile", help="cProfile the events into this file")
    asyncio.run(main(parser.parse_args()))

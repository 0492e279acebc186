"""Reply latency during a broadcast: the same users, at the same pace, talk to the bot
with no broadcast running and then while a big one goes out, in one run of one platform.

Why: issue 15 found replies queueing behind broadcast rows (0.05 s -> p50 0.8 s, up to
4 s, during a 300-recipient broadcast); a reply's latency must not depend on the size of a
running broadcast. The platform is ``botp run`` on SQLite (or ``botp web`` + 2 workers on
PostgreSQL with ``--setups postgres``) with one Telegram bot configured to ``--limit``
messages/s, which the fake Bot API (``bench/inbound.py``'s streaming fake, in its own
process) enforces with 429s. ``--recipients`` subscribers are bulk-loaded as in
``bench/broadcast.py``. ``--users`` new users arrive evenly over ``--duration`` seconds,
each going through ``bench/inbound.py``'s quiz (/start, "quiz", two buttons, an age) as
webhook POSTs; latency = POST start -> first message of the answer at the fake. Then the
broadcast starts and, from its first send on, the same users and pacing run again,
``--windows`` times (the first window is mostly while the broadcast is still queued).

    .venv/bin/python bench/replies.py [--recipients 100000] [--users 20] [--duration 25]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.broadcast import populate, start_broadcast  # noqa: E402
from bench.harness import drop_postgres, free_port, write_report  # noqa: E402
from bench.inbound import (  # noqa: E402
    SECRET,
    STEPS,
    TOKEN,
    BenchError,
    Child,
    LoadGenerator,
    Phase,
    Target,
    clean_env,
    spawn,
    start_platform,
    stop,
    wait_ready,
)
from bot_platform.migrations import upgrade  # noqa: E402

BOT_ID = "tg"  # the bot broadcast.populate's subscribers belong to
FIRST_USER = 10_000_001  # LoadGenerator's chats; the broadcast's are 1,000,000 + n


class Generator(LoadGenerator):
    """Also counts the broadcast's sends (chats below the users') as the fake streams them."""

    bulk = 0

    async def listen(self, ready: asyncio.Event) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
        async with self.http.get(f"{self.fake_url}/bench/sends", timeout=timeout) as response:
            ready.set()
            async for line in response.content:
                item = json.loads(line)
                self.last_send = time.monotonic()
                if item["chat"] < FIRST_USER:
                    self.bulk += 1
                elif (log := self.chats.get(item["chat"])) is not None:
                    log.add(item["at"], item["buttons"])


async def users(generator: Generator, target: Target, counts: tuple[int, ...],
                args: argparse.Namespace, label: str, children: list[Child]) -> dict[str, Any]:
    """``--users`` quizzes started evenly over ``--duration`` s, the broadcast's sends/s
    and the platform's CPU meanwhile (a busy core, or replies waiting in a queue?)."""
    rate = args.users * len(STEPS) / args.duration
    bulk_before = generator.bulk
    cpu_before = sum(child.cpu_seconds() for child in children)
    phase: Phase = await generator.open_loop(target, counts, rate, args.duration,
                                              args.users)
    summary = phase.summary()
    cpu = sum(child.cpu_seconds() for child in children) - cpu_before
    summary.update(phase=label, platform_cpu_percent=round(100 * cpu / phase.seconds),
                   broadcast_sent_per_s=(generator.bulk - bulk_before) / phase.seconds)
    print(f"  {label}: {summary['updates']} replies, p50 {summary['p50_ms'] or 0:.0f} ms, "
          f"p99 {summary['p99_ms'] or 0:.0f} ms, broadcast "
          f"{summary['broadcast_sent_per_s']:.0f}/s, platform CPU "
          f"{summary['platform_cpu_percent']}% of a core", file=sys.stderr)
    return summary


async def run_setup(setup: str, args: argparse.Namespace, generator: Generator,
                    folder: Path) -> list[dict[str, Any]]:
    """Start the platform, measure the users without and then during the broadcast."""
    children: list[Child] = []
    port = free_port()
    bot = {"id": BOT_ID, "channel": "telegram", "token": TOKEN, "secret": SECRET,
           "api_base": generator.fake_url, "messages_per_second": args.limit,
           # These users answer within milliseconds, no person does: Telegram's 1/s per
           # chat would add its own wait to both phases alike and hide the difference.
           "per_chat_per_second": args.limit}
    options = argparse.Namespace(profile=None, redis_db=args.redis_db, platform_env=[
        f"BOTP_BOTS={json.dumps([bot])}", f"BOTP_WORKER__BATCH_SIZE={args.batch}",
        f"BOTP_WORKER__CONCURRENCY={args.concurrency}", "BOTP_WORKER__POLL_INTERVAL=0.05"])
    database_url: str | None = None
    try:
        if setup == "sqlite":  # loaded before the process starts: one writer at a time
            database_url = f"sqlite+aiosqlite:///{folder}/botp.sqlite3"  # start_platform's
            await asyncio.to_thread(upgrade, database_url)
            broadcast_id = await populate(database_url, args.recipients)
        database_url = await start_platform(setup, options, generator.fake_url, port,
                                            folder, children)
        if database_url is None:
            return []
        if setup == "postgres":
            broadcast_id = await populate(database_url, args.recipients)
        await wait_ready(generator.http, f"http://127.0.0.1:{port}/healthz", children)
        target = Target(f"http://127.0.0.1:{port}/webhooks/telegram/{BOT_ID}")
        counts = await generator.calibrate(target)
        await generator.quiet()
        alone = await users(generator, target, counts, args, "no broadcast", children)
        await generator.quiet()
        started = time.monotonic()
        await start_broadcast(database_url, broadcast_id)
        while generator.bulk == 0:
            if time.monotonic() - started > 120:
                raise BenchError("the broadcast sent nothing in 120 s")
            await asyncio.sleep(0.05)
        first_send = time.monotonic() - started
        phases = [alone]
        for n in range(args.windows):  # the first one mostly while it is still queued
            end = (n + 1) * args.duration
            during = await users(generator, target, counts, args,
                                 f"broadcast {end - args.duration:.0f}-{end:.0f} s", children)
            during.update(first_broadcast_send_s=first_send, broadcast_sent_by_end=generator.bulk)
            phases.append(during)
        for child in children:
            if child.popen.poll() is not None:
                raise BenchError(f"{child.name} died during the run:\n{child.tail()}")
        return [{"setup": setup, "recipients": args.recipients, "limit": args.limit, **r}
                for r in phases]
    finally:
        stop(children)
        for child in children:
            problems = [line for line in child.tail(1_000_000).splitlines()
                        if "Traceback" in line or " ERROR " in line]
            if problems:
                print(f"  {child.name}: {len(problems)} error line(s)", file=sys.stderr)
        if database_url and setup == "postgres":
            await drop_postgres(database_url)


def print_table(results: list[dict[str, Any]]) -> None:
    print(f"{'setup':<9} {'phase':<20} {'replies':>7} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'max ms':>7} {'errors':>6} {'broadcast sent/s':>16} {'platform CPU':>12}")
    for r in results:
        print(f"{r['setup']:<9} {r['phase']:<20} {r['updates']:>7} {r['p50_ms'] or 0:>7.0f} "
              f"{r['p99_ms'] or 0:>7.0f} {r['max_ms'] or 0:>7.0f} "
              f"{sum(r['errors'].values()):>6} {r['broadcast_sent_per_s']:>16.0f} "
              f"{r['platform_cpu_percent']:>11}%")
    alone: dict[str, Any] = {}
    for r in results:
        if r["phase"] == "no broadcast":
            alone = r
        elif alone.get("p50_ms") and r["p50_ms"]:
            print(f"{r['setup']}, {r['phase']} / no broadcast: p50 x"
                  f"{r['p50_ms'] / alone['p50_ms']:.1f}, p99 x"
                  f"{r['p99_ms'] / alone['p99_ms']:.1f}; broadcast sent "
                  f"{r['broadcast_sent_by_end']} by the window's end")


async def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipients", type=int, default=100_000)
    parser.add_argument("--limit", type=int, default=1000, help="the bot's messages/s")
    parser.add_argument("--users", type=int, default=20, help="quizzes per phase")
    parser.add_argument("--duration", type=float, default=25.0, help="seconds per phase")
    parser.add_argument("--windows", type=int, default=2,
                        help="phases of --duration s each while the broadcast runs")
    parser.add_argument("--setups", default="sqlite", help="comma-separated: sqlite, postgres")
    parser.add_argument("--batch", type=int, default=1000, help="rows held per worker")
    parser.add_argument("--concurrency", type=int, default=128, help="sends in flight/worker")
    parser.add_argument("--step-timeout", type=float, default=30.0)
    parser.add_argument("--redis-db", type=int, default=12, help="flushed (PostgreSQL setup)")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "replies.json"))
    args = parser.parse_args()
    began = time.monotonic()
    load_before = os.getloadavg()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="botp-replies-") as name:
        folder = Path(name)
        fake = spawn("fake-telegram", [sys.executable, str(ROOT / "bench" / "inbound.py"),
                                       "--serve-fake", str(args.limit)],
                     {**clean_env(), "PYTHONPATH": str(ROOT)}, folder, stdout=subprocess.PIPE)
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=2.0)
        async with aiohttp.ClientSession(connector=connector) as http:
            listener: asyncio.Task[None] | None = None
            try:
                assert fake.popen.stdout is not None
                line = await asyncio.wait_for(asyncio.to_thread(fake.popen.stdout.readline),
                                              timeout=30)
                generator = Generator(http, line.decode().strip(), args.step_timeout)
                ready = asyncio.Event()
                listener = asyncio.create_task(generator.listen(ready))
                await asyncio.wait_for(ready.wait(), timeout=10)
                for setup in args.setups.split(","):
                    print(f"{setup} ... ({time.monotonic() - began:.0f} s in)",
                          file=sys.stderr, flush=True)
                    results += await run_setup(setup, args, generator, folder)
            finally:
                if listener is not None:
                    listener.cancel()
                    with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
                        await listener
                stop([fake])
    print_table(results)
    seconds = time.monotonic() - began
    print(f"{args.users} users per phase over {args.duration:.0f} s (a quiz each: "
          f"{len(STEPS)} webhook updates); broadcast to {args.recipients} at the bot's limit "
          f"{args.limit}/s; latency = POST start -> first answer at the fake. Took "
          f"{seconds:.0f} s; load average before {load_before[0]:.2f}.")
    return {"path": args.json, "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": os.uname().nodename, "cpus": os.cpu_count(),
            "args": {k: v for k, v in vars(args).items() if k != "json"},
            "seconds": round(seconds, 1), "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(), "results": results}


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    write_report(asyncio.run(main()))

"""What one inbound update costs each process: CPU milliseconds and PostgreSQL round
trips per update, for the PostgreSQL setup (``botp web`` + 2 ``botp worker``, and the
database server's backends of its database) or SQLite's ``botp run``.

Why: on a machine other work shares, updates/s says more about the neighbours than about
the code; CPU-seconds and round trips per update do not move with them (much). Same
load as ``bench/inbound.py`` (the quiz over webhooks to the fake Bot API), ``--users`` at
once for ``--duration`` seconds (the first ``--ramp`` not counted); ``--rate`` paces
updates instead. ``--trips`` counts asyncpg round trips in the platform's processes
(``bench/tripcount/sitecustomize.py``; it costs some CPU, so compare like with like).

    PYTHONPATH=. .venv/bin/python bench/inbound_costs.py [--setup postgres] [--users 40]
        [--duration 20] [--rate R] [--trips] [--profile DIR] [--repeat N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.harness import drop_postgres, free_port  # noqa: E402
from bench.inbound import (  # noqa: E402
    BOT_ID,
    WEB_PROCESSES,
    BenchError,
    Child,
    LoadGenerator,
    Target,
    clean_env,
    spawn,
    start_platform,
    stop,
    wait_ready,
)


def proc_cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def backends(database_url: str) -> dict[int, float]:
    """The database server's backends serving ``database_url``'s database: pid -> CPU s."""
    import asyncpg

    name = database_url.rpartition("/")[2]
    admin = await asyncpg.connect(database_url.replace("postgresql+asyncpg://",
                                                       "postgresql://"))
    try:
        pids = [r[0] for r in await admin.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND pid <> "
            "pg_backend_pid()", name)]
    finally:
        await admin.close()
    return {pid: proc_cpu(pid) for pid in pids}


def trip_counts(folder: Path | None, children: list[Child]) -> dict[str, Any]:
    """Round trips so far per child (and, under "detail", per child and statement)."""
    if folder is None:
        return {}
    names = {pid: c.name for c in children for pid in c.pids()}
    found: dict[str, Any] = {"detail": {}}
    for path in folder.glob("*.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        name = names.get(int(path.stem))
        if name is not None:  # a forked process's counts add to its parent's
            found[name] = found.get(name, 0) + sum(data["counts"].values())
            detail = found["detail"].setdefault(name, {})
            for sql, count in data.get("detail", {}).items():
                detail[sql] = detail.get(sql, 0) + count
    return found


async def measure(args: argparse.Namespace, http: aiohttp.ClientSession,
                  generator: LoadGenerator, fake: Child, folder: Path) -> dict[str, Any]:
    children: list[Child] = []
    port = free_port()
    trips_dir = None
    extra = list(args.platform_env)
    if args.trips or args.trips_detail:
        trips_dir = Path(tempfile.mkdtemp(prefix="trips-", dir=folder))
        extra += [f"PYTHONPATH={ROOT / 'bench' / 'tripcount'}:{os.environ.get('PYTHONPATH', '')}",
                  f"BOTP_BENCH_TRIPS_DIR={trips_dir}",
                  f"BOTP_BENCH_TRIPS_DETAIL={args.trips_detail}"]
    run_args = argparse.Namespace(profile=args.profile, platform_env=extra,
                                  redis_db=args.redis_db, web_processes=WEB_PROCESSES)
    database_url = None
    try:
        database_url = await start_platform(args.setup, run_args, generator.fake_url, port,
                                            folder, children)
        if database_url is None:
            raise BenchError("PostgreSQL not reachable")
        target = Target(f"http://127.0.0.1:{port}/webhooks/telegram/{BOT_ID}")
        await wait_ready(http, f"http://127.0.0.1:{port}/healthz", children)
        counts = await generator.calibrate(target)
        await generator.quiet()
        pg = args.setup != "sqlite"
        cpu0 = {c.name: c.cpu_seconds() for c in children}
        db0 = await backends(database_url) if pg else {}
        await asyncio.sleep(0.6)
        trips0 = trip_counts(trips_dir, children)
        print(f"measuring: {' '.join(f'{c.name}={c.pid}' for c in children)}",
              file=sys.stderr, flush=True)
        started = time.monotonic()
        if args.rate:
            phase = await generator.open_loop(target, counts, args.rate, args.duration, 1000)
            updates = len(phase.records)
        else:
            phase = await generator.closed_loop(target, counts, args.users, args.duration, 0)
            updates = len(phase.records)
        await generator.quiet(0.5)
        wall = time.monotonic() - started
        await asyncio.sleep(0.6)
        trips1 = trip_counts(trips_dir, children)
        cpu1 = {c.name: c.cpu_seconds() for c in children}
        db1 = await backends(database_url) if pg else {}
        per = {name: 1000 * (cpu1[name] - cpu0[name]) / updates for name in cpu0}
        if pg:
            per["postgres-server"] = 1000 * sum(
                cpu - db0.get(pid, 0.0) for pid, cpu in db1.items()) / updates
        detail = {}
        for name, now in trips1.get("detail", {}).items():
            before = trips0.get("detail", {}).get(name, {})
            detail[name] = sorted(((count - before.get(sql, 0)) / updates, sql)
                                  for sql, count in now.items()
                                  if count > before.get(sql, 0))[::-1]
        return {"updates": updates, "trips_detail": detail, "per_s": updates / wall,
                "answers": counts,
                "cpu_ms_per_update": per,
                "trips_per_update": {k: (trips1.get(k, 0) - trips0.get(k, 0)) / updates
                                     for k in trips1 if k != "detail"},
                "errors": dict(phase.errors), "loadavg": os.getloadavg()[0]}
    finally:
        stop(children)
        if database_url and args.setup != "sqlite":
            await drop_postgres(database_url)


def show(result: dict[str, Any]) -> None:
    cpu = result["cpu_ms_per_update"]
    trips = result["trips_per_update"]
    parts = [f"{name} {ms:.2f}" + (f" ({trips[name]:.1f} trips)" if name in trips else "")
             for name, ms in cpu.items()]
    print(f"{result['updates']} updates, {result['per_s']:.0f}/s, load {result['loadavg']:.1f}"
          f"; CPU ms/update: {'; '.join(parts)}; platform total "
          f"{sum(v for k, v in cpu.items() if k != 'postgres-server'):.2f}"
          + (f"; errors {result['errors']}" if result["errors"] else ""), flush=True)
    for name, rows in result.get("trips_detail", {}).items():
        print(f"  {name}:")
        for per, sql in rows:
            if per >= 0.01:
                print(f"    {per:6.2f}  {sql}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setup", choices=("postgres", "postgres-1", "sqlite"),
                        default="postgres",
                        help="postgres: web x2 (botp web --processes 2); postgres-1: web x1")
    parser.add_argument("--users", type=int, default=40)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--rate", type=float, help="updates/s, paced (else closed loop)")
    parser.add_argument("--trips", action="store_true")
    parser.add_argument("--trips-detail", type=int, default=0, metavar="CHARS",
                        help="with --trips: per statement (its first CHARS characters)")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--profile", metavar="DIR")
    parser.add_argument("--redis-db", type=int, default=10)
    parser.add_argument("--platform-env", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="botp-costs-") as name:
        folder = Path(name)
        fake = spawn("fake-telegram", [sys.executable, str(ROOT / "bench" / "inbound.py"),
                                       "--serve-fake"],
                     {**clean_env(), "PYTHONPATH": str(ROOT)}, folder, stdout=subprocess.PIPE)
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=2.0)
        async with aiohttp.ClientSession(connector=connector) as http:
            listener = None
            try:
                assert fake.popen.stdout is not None
                line = await asyncio.wait_for(asyncio.to_thread(fake.popen.stdout.readline), 30)
                generator = LoadGenerator(http, line.decode().strip(), 30.0)
                ready = asyncio.Event()
                listener = asyncio.create_task(generator.listen(ready))
                await asyncio.wait_for(ready.wait(), timeout=10)
                for _ in range(args.repeat):
                    show(await measure(args, http, generator, fake, folder))
            finally:
                if listener is not None:
                    listener.cancel()
                stop([fake])


if __name__ == "__main__":
    asyncio.run(main())

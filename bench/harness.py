"""What the benchmarks share: fresh PostgreSQL databases, ``botp`` processes with their
peak memory, and the Telegram fake in a process of its own (so the platform under test
does not share its event loop with "the messenger").

    python bench/harness.py serve-telegram --port P [--limit L]   # the fake, standalone
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

POSTGRES_URL = os.environ.get("BOTP_TEST_POSTGRES_URL",
                              "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("BOTP_TEST_REDIS_URL", "redis://127.0.0.1:6379/14")


def _admin_dsn() -> str:
    return POSTGRES_URL.replace("postgresql+asyncpg://", "postgresql://")


async def postgres_database() -> str | None:
    """A new empty database (its URL), or None with a note when PostgreSQL is away."""
    try:
        import asyncpg

        admin = await asyncio.wait_for(asyncpg.connect(_admin_dsn()), timeout=3)
    except Exception as error:
        print(f"PostgreSQL not reachable ({type(error).__name__}): skipped", file=sys.stderr)
        return None
    name = f"botp_bench_{uuid.uuid4().hex[:8]}"
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    return f"{POSTGRES_URL.rpartition('/')[0]}/{name}"


async def drop_postgres(url: str) -> None:
    import asyncpg

    admin = await asyncpg.connect(_admin_dsn())
    await admin.execute(f'DROP DATABASE IF EXISTS "{url.rpartition("/")[2]}" WITH (FORCE)')
    await admin.close()


async def redis_available(url: str = REDIS_URL) -> bool:
    from redis.asyncio import Redis

    client = Redis.from_url(url, socket_connect_timeout=3)
    try:
        await client.flushdb()
        return True
    except Exception as error:
        print(f"Redis not reachable ({type(error).__name__}): skipped", file=sys.stderr)
        return False
    finally:
        await client.aclose()


def write_report(report: dict[str, Any]) -> None:
    """Write a benchmark's JSON report to its ``path`` (popped from the report)."""
    path = Path(report.pop("path"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str))


async def on_database(backend: str, body: Any) -> None:
    """``await body(url)`` on a fresh database: a temporary SQLite file, or a PostgreSQL
    database created for the run and dropped after it (nothing when none is reachable)."""
    if backend == "sqlite":
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            await body(f"sqlite+aiosqlite:///{folder}/s.sqlite3")
        return
    url = await postgres_database()
    if url is None:
        return
    try:
        await body(url)
    finally:
        await drop_postgres(url)


async def run_until_idle(scheduler: Any, profile_path: str | None = None
                         ) -> tuple[int, float, float, float]:
    """``scheduler.run_once`` until it finds nothing: (rounds, process CPU, the loop
    thread's CPU, wall seconds), cProfiled into ``profile_path`` when given."""
    profile = None
    if profile_path:
        import cProfile

        profile = cProfile.Profile()
        profile.enable()
    cpu, loop, wall = time.process_time(), time.thread_time(), time.perf_counter()
    rounds = 0
    while await scheduler.run_once():
        rounds += 1
    measured = (rounds, time.process_time() - cpu, time.thread_time() - loop,
                time.perf_counter() - wall)
    if profile is not None:
        profile.disable()
        profile.dump_stats(profile_path)
    return measured


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM), in MB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


@dataclass
class Process:
    """A child process (``botp`` command or a helper) with its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    peak_mb: float = 0.0

    def sample(self) -> float:
        self.peak_mb = max(self.peak_mb, peak_rss_mb(self.popen.pid))
        return self.peak_mb

    def stop(self, grace: float = 20.0) -> int | None:
        if self.popen.poll() is None:
            self.sample()
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode

    def problems(self) -> list[str]:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return [line for line in text.splitlines() if "Traceback" in line or " ERROR " in line]


@dataclass
class Processes:
    """Children started for one run; all stopped on exit, even on failure."""

    folder: Path
    children: list[Process] = field(default_factory=list)

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> Process:
        log = self.folder / f"{name}.log"
        with log.open("ab") as output:
            popen = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=output, stderr=output)
        child = Process(name, popen, log)
        self.children.append(child)
        return child

    def botp(self, name: str, command: str, env: dict[str, str]) -> Process:
        return self.start(name, [sys.executable, "-m", "bot_platform.cli", command], env)

    def sample(self) -> None:
        for child in self.children:
            child.sample()

    def stop_all(self) -> None:
        for child in reversed(self.children):
            child.stop()

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def botp_env(database_url: str, **settings: Any) -> dict[str, str]:
    """The environment of a ``botp`` process: ``BOTP_`` variables from keyword arguments
    (``worker__batch_size=500`` -> ``BOTP_WORKER__BATCH_SIZE``)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("BOTP_")}
    env.update({"BOTP_DATABASE_URL": database_url, "BOTP_FLOWS_DIR": str(ROOT / "flows"),
                "BOTP_LOCALES_DIR": str(ROOT / "locales"), "BOTP_LOG_LEVEL": "WARNING"})
    env.update({f"BOTP_{key.upper()}": str(value) for key, value in settings.items()})
    return env


class FakeTelegram:
    """The Telegram fake (tests/fakes/telegram_api.py) in its own process; ``stats()``
    reads what it received through ``GET /stats``."""

    def __init__(self, processes: Processes, limit: float | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, str(Path(__file__)), "serve-telegram", "--port",
                str(self.port)]
        if limit:
            argv += ["--limit", str(limit)]
        self.process = processes.start("fake-telegram", argv, dict(os.environ))

    async def ready(self, http: Any, limit: float = 20.0) -> None:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            try:
                await self.stats(http)
                return
            except Exception:
                await asyncio.sleep(0.1)
        raise RuntimeError("the Telegram fake did not start")

    async def stats(self, http: Any) -> dict[str, Any]:
        async with http.get(f"{self.url}/stats") as response:
            return await response.json()


def serve_telegram(port: int, limit: float | None) -> None:
    from aiohttp import web

    from tests.fakes.telegram_api import FakeTelegramServer

    class Counting(FakeTelegramServer):
        """Keeps counts instead of every call, so 100,000 sends cost no memory here."""

        def __init__(self) -> None:
            super().__init__()
            self.ok = 0
            self.first_ok = self.last_ok = 0.0
            self.chats: dict[int, int] = {}
            self.per_second: dict[int, int] = {}

        async def _send(self, call: Any, **extra: Any) -> web.Response:
            response = await super()._send(call, **extra)
            self.calls.clear()
            if call.params.get("_ok"):
                now = time.time()
                self.ok += 1
                self.first_ok = self.first_ok or now
                self.last_ok = now
                second = int(now)
                self.per_second[second] = self.per_second.get(second, 0) + 1
                chat = int(call.params["chat_id"])
                self.chats[chat] = self.chats.get(chat, 0) + 1
            return response

        async def _stats(self, request: web.Request) -> web.Response:
            return web.json_response({
                "ok": self.ok, "too_many_requests": self.too_many_requests,
                "first_ok": self.first_ok, "last_ok": self.last_ok,
                "chats": len(self.chats),
                "per_second": [self.per_second[k] for k in sorted(self.per_second)],
                "doubled": sum(1 for n in self.chats.values() if n > 1)})

        def routes(self, app: web.Application) -> None:
            super().routes(app)
            app.router.add_get("/stats", self._stats)

    async def serve() -> None:
        fake = Counting()
        if limit:
            fake.rate_limit(per_second=limit, retry_after=1)
        app = web.Application()
        fake.routes(app)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await runner.cleanup()

    asyncio.run(serve())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="benchmark helpers")
    commands = parser.add_subparsers(dest="command", required=True)
    fake_parser = commands.add_parser("serve-telegram")
    fake_parser.add_argument("--port", type=int, required=True)
    fake_parser.add_argument("--limit", type=float)
    args = parser.parse_args()
    serve_telegram(args.port, args.limit)

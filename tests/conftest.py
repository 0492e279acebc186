"""Shared fixtures: a platform on a fresh database, per test, with a manual clock.

PostgreSQL and Redis tests use the machine's servers (``BOTP_TEST_POSTGRES_URL``,
``BOTP_TEST_REDIS_URL``); they skip when none is reachable, unless
``BOTP_REQUIRE_SERVICES=1`` (set by ``.ci/run``) turns the skip into a failure.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from bot_platform.clock import ManualClock
from bot_platform.config import BotConfig, Settings, WorkerSettings
from bot_platform.platform import Platform
from tests.fakes.telegram_api import FakeTelegramServer
from tests.support.telegram import SECRET, TOKEN

ROOT = Path(__file__).resolve().parents[1]
POSTGRES_URL = os.environ.get(
    "BOTP_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("BOTP_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
REQUIRE_SERVICES = os.environ.get("BOTP_REQUIRE_SERVICES") == "1"


def service_missing(name: str, reason: str) -> None:
    """Skip (on a laptop) or fail (in CI) a test whose service is unreachable."""
    message = f"{name} not reachable ({reason})"
    if REQUIRE_SERVICES:
        pytest.fail(f"{message}; BOTP_REQUIRE_SERVICES=1 makes this mandatory")
    pytest.skip(f"{message}; start it or set BOTP_TEST_{name.upper()}_URL")


class TestPlatform(Platform):
    """A platform with test conveniences."""

    __test__ = False
    _test_app: Any = None

    def http_client(self) -> httpx.AsyncClient:
        """An HTTP client talking to the ASGI app in-process. The app is built once per
        platform, as a served process does: building it takes 0.2 s, and tests post
        hundreds of webhooks."""
        if self._test_app is None:
            self._test_app = self.app()
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self._test_app),
                                 base_url="http://testserver")


class WorkerProcess:
    """``botp worker`` (or another ``command``) in a child process, killable with
    SIGKILL. Its log goes to ``log`` when given (appended across restarts)."""

    def __init__(self, env: dict[str, str], log: Path | None = None,
                 command: str = "worker") -> None:
        self.env = env
        self.log = log
        self.command = command
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        output = self.log.open("ab") if self.log else subprocess.DEVNULL
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bot_platform.cli", self.command], cwd=ROOT, env=self.env,
            stdout=output, stderr=output)
        if self.log:
            output.close()  # type: ignore[union-attr]

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM (a graceful stop); returns the exit code."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill()


async def wait_for(predicate, limit: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def make_settings(database_url: str, bots: list[BotConfig] | None = None,
                  **overrides: Any) -> Settings:
    worker = overrides.pop("worker", None) or WorkerSettings(
        poll_interval=0.05, lease_seconds=30, backoff_base=1.0, max_attempts=5)
    values: dict[str, Any] = {
        "database_url": database_url, "bots": bots or [], "flows_dir": ROOT / "flows",
        "locales_dir": ROOT / "locales", "worker": worker, **overrides}
    return Settings(_env_file=None, **values)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path}/botp.sqlite3"


async def _postgres_reachable(url: str) -> str | None:
    import asyncpg

    dsn = url.replace("postgresql+asyncpg://", "postgresql://")
    try:
        connection = await asyncio.wait_for(asyncpg.connect(dsn), timeout=3)
    except Exception as error:  # any failure means "not reachable" here
        return f"{type(error).__name__}: {error}"
    await connection.close()
    return None


# Databases this session created, dropped when it ends: every DROP DATABASE forces a
# checkpoint that writes out all the session's new databases, over a second per test on
# the 2-core machine; dropped together at the end, only the first one pays it.
_TO_DROP: list[str] = []


@asynccontextmanager
async def fresh_postgres_database() -> AsyncIterator[str]:
    """Create an empty PostgreSQL database for one test; afterwards its connections are
    ended at once and the database is dropped when the session ends."""
    import asyncpg

    problem = await _postgres_reachable(POSTGRES_URL)
    if problem:
        service_missing("postgres", problem)
    admin_dsn = POSTGRES_URL.replace("postgresql+asyncpg://", "postgresql://")
    name = f"botp_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(admin_dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    base, _, _ = POSTGRES_URL.rpartition("/")
    try:
        yield f"{base}/{name}"
    finally:
        _TO_DROP.append(name)
        admin = await asyncpg.connect(admin_dsn)
        await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE datname = $1 AND pid <> pg_backend_pid()", name)
        await admin.close()


async def _drop_databases(names: list[str]) -> None:
    import asyncpg

    admin = await asyncpg.connect(POSTGRES_URL.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        for name in names:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Drop the PostgreSQL databases the tests created (see ``_TO_DROP``)."""
    if _TO_DROP:
        names, _TO_DROP[:] = list(_TO_DROP), []
        asyncio.run(_drop_databases(names))


@pytest.fixture
async def postgres_url() -> AsyncIterator[str]:
    """A fresh, empty PostgreSQL database for one test."""
    async with fresh_postgres_database() as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """Run a test once per storage backend."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path}/backend.sqlite3"
        return
    async with fresh_postgres_database() as url:
        yield url


async def _redis_problem(url: str) -> str | None:
    from redis.asyncio import Redis

    client = Redis.from_url(url, socket_connect_timeout=3)
    try:
        await client.ping()
    except Exception as error:  # any failure means "not reachable" here
        return f"{type(error).__name__}: {error}"
    finally:
        await client.aclose()
    return None


@asynccontextmanager
async def empty_redis() -> AsyncIterator[str]:
    """The test Redis database, emptied before and after use."""
    from redis.asyncio import Redis

    problem = await _redis_problem(REDIS_URL)
    if problem:
        service_missing("redis", problem)
    client = Redis.from_url(REDIS_URL)
    await client.flushdb()
    try:
        yield REDIS_URL
    finally:
        await client.flushdb()
        await client.aclose()


@pytest.fixture
async def redis_url() -> AsyncIterator[str]:
    async with empty_redis() as url:
        yield url


@pytest.fixture
async def make_platform(tmp_path: Path) -> AsyncIterator[Any]:
    """Build started platforms on fresh SQLite files (or a given URL); closed at the end.

        platform = await make_platform(bots=[BotConfig(...)], clock=ManualClock(),
                                       flows_dir=..., database_url=...)
    """
    built: list[Platform] = []
    counter = itertools.count()

    async def factory(bots: list[BotConfig] | None = None, *, clock: Any = None,
                      database_url: str | None = None, channel_overrides: Any = None,
                      limiter: Any = None, **overrides: Any) -> TestPlatform:
        url = database_url or f"sqlite+aiosqlite:///{tmp_path}/platform{next(counter)}.sqlite3"
        platform = TestPlatform(make_settings(url, bots, **overrides),
                                clock=clock or ManualClock(), limiter=limiter,
                                channel_overrides=channel_overrides)
        built.append(platform)  # closed even when start() fails
        await platform.db.create_all()
        await platform.start()
        return platform

    yield factory
    for platform in built:
        await platform.close()


@pytest.fixture
async def fake() -> AsyncIterator[FakeTelegramServer]:
    """The fake Telegram Bot API; a module whose ``fake`` is another messenger's defines
    its own."""
    async with FakeTelegramServer() as server:
        yield server


@pytest.fixture
async def telegram(make_platform: Any, fake: FakeTelegramServer) -> TestPlatform:
    """A platform with one Telegram bot ("shop") talking to ``fake``."""
    return await make_platform(bots=[BotConfig(id="shop", channel="telegram", token=TOKEN,
                                               secret=SECRET, api_base=fake.url)])

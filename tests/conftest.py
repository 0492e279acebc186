"""Shared fixtures: a platform on a fresh database, per test, with a manual clock.

PostgreSQL and Redis tests use the machine's servers (``BOTP_TEST_POSTGRES_URL``,
``BOTP_TEST_REDIS_URL``); they skip when none is reachable, unless
``BOTP_REQUIRE_SERVICES=1`` (set by ``.ci/run``) turns the skip into a failure.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bot_platform.clock import ManualClock
from bot_platform.config import BotConfig
from bot_platform.platform import Platform
from tests.fakes.telegram_api import FakeTelegramServer
from tests.support.platform import TestPlatform, make_settings
from tests.support.services import drop_created_databases, empty_redis, fresh_postgres_database
from tests.support.telegram import SECRET, TOKEN


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Drop the PostgreSQL databases the tests created."""
    drop_created_databases()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path}/botp.sqlite3"


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

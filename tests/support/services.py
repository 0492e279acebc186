"""PostgreSQL and Redis for tests: the machine's servers (``BOTP_TEST_POSTGRES_URL``,
``BOTP_TEST_REDIS_URL``), a fresh database per test, skipped when unreachable unless
``BOTP_REQUIRE_SERVICES=1`` (set by ``.ci/run``) turns the skip into a failure."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

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


def drop_created_databases() -> None:
    """Drop the PostgreSQL databases the tests created (see ``_TO_DROP``); conftest calls
    it when the session ends."""
    if _TO_DROP:
        names, _TO_DROP[:] = list(_TO_DROP), []
        asyncio.run(_drop_databases(names))


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

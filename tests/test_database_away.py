"""A database that is away (a PostgreSQL restart: connection refused) gives webhooks, the
health check and the admin API a 503 with one log line per request, not an unhandled 500
with a traceback from the engine and another from the server (issue 15, item 7)."""

from __future__ import annotations

import logging
import socket
from typing import Any

import pytest

from bot_platform.apikeys import create_key
from bot_platform.database import Database
from bot_platform.errors import StorageUnavailable
from tests.test_cli_and_web import CONSOLE_AUTH, CONSOLE_SECRET


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def database_away(platform: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every session of the running platform now goes to a PostgreSQL that refuses."""
    away = Database(f"postgresql+asyncpg://postgres@127.0.0.1:{closed_port()}/test")
    monkeypatch.setattr(platform.db, "engine", away.engine)
    monkeypatch.setattr(platform.db, "sessions", away.sessions)


def warnings_and_worse(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_a_session_on_a_refusing_database_raises_storage_unavailable() -> None:
    away = Database(f"postgresql+asyncpg://postgres@127.0.0.1:{closed_port()}/test")
    try:
        with pytest.raises(StorageUnavailable) as raised:
            await away.ping()
        assert isinstance(raised.value.__cause__, ConnectionRefusedError)
    finally:
        await away.close()


async def test_a_signed_webhook_gets_503_and_one_log_line_without_traceback(
        make_platform, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    platform = await make_platform(console_secret=CONSOLE_SECRET,
                                   flow_reload_seconds=0)  # no background reader
    database_away(platform, monkeypatch)
    body = {"user_id": "w1", "text": "/start", "event_id": "evt-1", "first_name": "Kim"}
    with caplog.at_level(logging.INFO):
        async with platform.http_client() as client:  # an unhandled error would raise here
            response = await client.post("/webhooks/console/console", json=body,
                                         headers=CONSOLE_AUTH)
    assert response.status_code == 503
    assert response.headers["retry-after"].isdigit()
    [record] = warnings_and_worse(caplog)
    assert record.exc_info is None and record.exc_text is None
    assert "/webhooks/console/console answered 503" in record.getMessage()
    assert "database is unavailable" in record.getMessage()


async def test_health_check_and_admin_api_answer_503_while_the_database_is_away(
        make_platform, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    platform = await make_platform(flow_reload_seconds=0)  # no background reader
    _, key = await create_key(platform.db, name="ops", role="admin", now=platform.clock.now())
    database_away(platform, monkeypatch)
    with caplog.at_level(logging.INFO):
        async with platform.http_client() as client:
            health = await client.get("/healthz")
            api = await client.get("/api/bots", headers={"X-API-Key": key})
    assert health.status_code == 503 and health.text == "unavailable, try again"
    assert api.status_code == 503
    assert api.json() == {"detail": "the database is unavailable; try again shortly"}
    records = warnings_and_worse(caplog)
    assert len(records) == 2
    assert all(r.exc_info is None for r in records)

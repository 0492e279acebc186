"""Migrations upgrade to head and downgrade to base on SQLite and PostgreSQL, and head
matches the models exactly."""

from __future__ import annotations

import asyncio

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from bot_platform.database import create_engine
from bot_platform.migrations import downgrade, upgrade
from bot_platform.models import Base

TABLES = {"contacts", "subscribers", "subscriber_tags", "flow_states", "messages",
          "processed_events", "jobs", "outbox", "kv", "conversations", "events",
          "promo_codes", "products", "tracked_links", "answers",
          "game_spins", "game_wins", "referrals", "api_keys",
          "broadcasts", "broadcast_recipients", "bots", "flow_versions",
          "conversation_notes", "ai_budget"}


async def _schema(url: str) -> tuple[set[str], list]:
    engine = create_engine(url)
    async with engine.connect() as connection:
        def read(sync_connection):
            tables = set(inspect(sync_connection).get_table_names()) - {"alembic_version"}
            context = MigrationContext.configure(sync_connection, opts={"compare_type": True})
            return tables, compare_metadata(context, Base.metadata)
        result = await connection.run_sync(read)
    await engine.dispose()
    return result


def _round_trip(url: str) -> None:
    upgrade(url)
    tables, differences = asyncio.run(_schema(url))
    assert tables == TABLES
    assert differences == [], f"models and migrations differ: {differences}"
    downgrade(url, "base")
    tables, _ = asyncio.run(_schema(url))
    assert tables == set()
    upgrade(url)  # and up again, cleanly
    assert asyncio.run(_schema(url))[0] == TABLES


def test_sqlite_upgrade_downgrade(tmp_path) -> None:
    _round_trip(f"sqlite+aiosqlite:///{tmp_path}/m.sqlite3")


@pytest.mark.postgres
def test_postgres_upgrade_downgrade(postgres_url: str) -> None:
    _round_trip(postgres_url)

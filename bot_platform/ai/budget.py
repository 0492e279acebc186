"""The monthly token budget as a reservation: a call reserves its maximum before it is made
(compare-and-set on a shared counter) and settles with its real usage afterwards, so no
number of concurrent calls, in any number of processes, can spend more than the budget.

Checking the budget before a call and adding the usage after it (what this replaces) let
every call in flight pass the same check: 20 concurrent questions spent 5-6 times the
budget. The reservation is an upper bound of the call: the prompt's UTF-8 bytes (a token is
at least one byte in byte-level tokenizers) plus ``max_tokens``, which the server caps.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, Protocol

from sqlalchemy import select, update

from bot_platform.database import Database
from bot_platform.models import AiBudget

log = logging.getLogger(__name__)

# Role markers and the chat template around each message (generous for every template).
MESSAGE_OVERHEAD = 16


def reservation(messages: Sequence[dict[str, Any]], max_tokens: int,
                bytes_per_token: float = 1.0) -> int:
    """The most tokens a call with ``messages`` can be billed for."""
    size = sum(len(str(m.get("content", "")).encode("utf-8")) for m in messages)
    return math.ceil(size / bytes_per_token) + MESSAGE_OVERHEAD * (len(messages) + 1) \
        + max_tokens


class TokenBudget(Protocol):
    """Tokens per bot and month: reserved before a call, settled after it."""

    async def reserve(self, bot_id: str, month: str, tokens: int, limit: int) -> bool:
        """Take ``tokens`` if spent + reserved + tokens stays within ``limit`` (0 = no
        limit); False, and nothing taken, otherwise."""
        ...

    async def settle(self, bot_id: str, month: str, reserved: int, used: int) -> None:
        """Give back a reservation and count what the call really used."""
        ...

    async def spent(self, bot_id: str, month: str) -> int: ...


class MemoryTokenBudget:
    """One process's budget (tests, ``botp chat``): atomic because nothing awaits inside."""

    def __init__(self) -> None:
        self.used: dict[tuple[str, str], int] = {}
        self.held: dict[tuple[str, str], int] = {}

    async def reserve(self, bot_id: str, month: str, tokens: int, limit: int) -> bool:
        key = (bot_id, month)
        if limit and self.used.get(key, 0) + self.held.get(key, 0) + tokens > limit:
            return False
        self.held[key] = self.held.get(key, 0) + tokens
        return True

    async def settle(self, bot_id: str, month: str, reserved: int, used: int) -> None:
        key = (bot_id, month)
        self.held[key] = max(0, self.held.get(key, 0) - reserved)
        self.used[key] = self.used.get(key, 0) + used

    async def spent(self, bot_id: str, month: str) -> int:
        return self.used.get((bot_id, month), 0)


class SqlTokenBudget:
    """The budget in the ``ai_budget`` table, shared by every process. Each change is one
    conditional UPDATE: PostgreSQL re-checks its WHERE on the row's newest version after
    waiting for a concurrent writer, SQLite runs writers one at a time, so a reservation
    is never granted from a stale count."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def reserve(self, bot_id: str, month: str, tokens: int, limit: int) -> bool:
        row = (AiBudget.bot_id == bot_id, AiBudget.month == month)
        fits = [AiBudget.spent + AiBudget.reserved + tokens <= limit] if limit else []
        async with self.db.session() as session:
            if session.bind.dialect.name == "postgresql":
                from sqlalchemy.dialects.postgresql import insert
            else:
                from sqlalchemy.dialects.sqlite import insert
            await session.execute(insert(AiBudget).values(
                bot_id=bot_id, month=month, spent=0, reserved=0).on_conflict_do_nothing())
            taken = await session.execute(update(AiBudget).where(*row, *fits).values(
                reserved=AiBudget.reserved + tokens).execution_options(
                synchronize_session=False))
            return bool(taken.rowcount)  # type: ignore[attr-defined]

    async def settle(self, bot_id: str, month: str, reserved: int, used: int) -> None:
        async with self.db.session() as session:
            await session.execute(update(AiBudget).where(
                AiBudget.bot_id == bot_id, AiBudget.month == month).values(
                reserved=AiBudget.reserved - reserved, spent=AiBudget.spent + used)
                .execution_options(synchronize_session=False))

    async def spent(self, bot_id: str, month: str) -> int:
        async with self.db.session() as session:
            return int(await session.scalar(select(AiBudget.spent).where(
                AiBudget.bot_id == bot_id, AiBudget.month == month)) or 0)

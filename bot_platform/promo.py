"""Promo code pools: codes imported from files and handed out atomically, never twice.

The draw is one ``UPDATE ... WHERE id = (SELECT ... LIMIT 1 [FOR UPDATE SKIP LOCKED])
RETURNING code`` inside the caller's transaction, so a code is given to exactly one
customer even when many draw at once (and in several processes on PostgreSQL).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from bot_platform.database import Database, insert_ignore
from bot_platform.models import PromoCode


async def import_codes(db: Database, pool: str, codes: Iterable[str], now: datetime) -> int:
    """Add codes to a pool (duplicates ignored); returns how many were new."""
    added = 0
    batch: list[dict] = []

    async def flush() -> None:
        nonlocal added
        if not batch:
            return
        async with db.session() as session:
            before, _ = await pool_counts(session, pool)
            await session.execute(insert_ignore(session, PromoCode), batch)
            after, _ = await pool_counts(session, pool)
            added += after - before
        batch.clear()

    for code in codes:
        code = code.strip()
        if code and not code.startswith("#"):
            batch.append({"pool": pool, "code": code, "created_at": now})
            if len(batch) >= 1000:
                await flush()
    await flush()
    return added


async def draw_code(session: AsyncSession, *, pool: str, contact_id: int, subscriber_id: int,
                    now: datetime, once_per_contact: bool = True) -> str | None:
    """Hand out one free code of ``pool`` (or the one this contact already has)."""
    if once_per_contact:
        existing = await session.scalar(select(PromoCode.code).where(
            PromoCode.pool == pool, PromoCode.contact_id == contact_id).limit(1))
        if existing is not None:
            return existing
    free = (select(PromoCode.id).where(PromoCode.pool == pool, PromoCode.issued_at.is_(None))
            .order_by(PromoCode.id).limit(1))
    if session.bind.dialect.name != "sqlite":
        free = free.with_for_update(skip_locked=True)
    return await session.scalar(
        update(PromoCode).where(PromoCode.id == free.scalar_subquery())
        .values(contact_id=contact_id, subscriber_id=subscriber_id, issued_at=now)
        .returning(PromoCode.code).execution_options(synchronize_session=False))


async def pool_counts(session: AsyncSession, pool: str) -> tuple[int, int]:
    """(codes in the pool, codes still free)."""
    total = await session.scalar(select(func.count()).where(PromoCode.pool == pool))
    free = await session.scalar(select(func.count()).where(
        PromoCode.pool == pool, PromoCode.issued_at.is_(None)))
    return total or 0, free or 0

"""Promo games: a prize wheel with weighted prizes, stock limits, a spin allowance per
contact (plus extra spins for referrals), and prizes paid out as unique promo codes.

A spin is counted with one conditional ``UPDATE ... WHERE spins < allowed`` so a contact
never exceeds its allowance, even with several messages in flight; codes are drawn later
(after the customer confirms) by the atomic ``promo_code`` action.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from bot_platform.database import insert_ignore
from bot_platform.models import GameSpin, GameWin, PromoCode, Referral

NO_SPINS = "no_spins"
OUT_OF_PRIZES = "out_of_prizes"
REFERRAL_PREFIX = "rf-"


async def take_spin(session: AsyncSession, *, contact_id: int, game: str,
                    allowed: int) -> int | None:
    """Count one spin; returns the spin number, or None when the allowance is used up."""
    for _ in range(2):
        spins = await session.scalar(
            update(GameSpin).where(GameSpin.contact_id == contact_id, GameSpin.game == game,
                                   GameSpin.spins < allowed)
            .values(spins=GameSpin.spins + 1).returning(GameSpin.spins)
            .execution_options(synchronize_session=False))
        if spins is not None:
            return spins
        exists = await session.scalar(select(GameSpin.spins).where(
            GameSpin.contact_id == contact_id, GameSpin.game == game))
        if exists is not None or allowed < 1:
            return None
        created = await session.execute(insert_ignore(session, GameSpin).values(
            contact_id=contact_id, game=game, spins=1))
        if created.rowcount:
            return 1
    return None


async def referral_count(session: AsyncSession, contact_id: int) -> int:
    return await session.scalar(select(func.count()).where(
        Referral.referrer_contact_id == contact_id)) or 0


async def in_stock(session: AsyncSession, game: str, prize: str, pool: str | None,
                   stock: int | None) -> bool:
    if stock is not None:
        won = await session.scalar(select(func.count()).where(
            GameWin.game == game, GameWin.prize == prize))
        if (won or 0) >= stock:
            return False
    if pool is not None:
        free = await session.scalar(select(PromoCode.id).where(
            PromoCode.pool == pool, PromoCode.issued_at.is_(None)).limit(1))
        return free is not None
    return True


def choose(prizes: Sequence[tuple[str, float]], rng: random.Random) -> str | None:
    """A weighted random choice among (name, weight)."""
    total = sum(weight for _, weight in prizes)
    if total <= 0:
        return None
    point = rng.uniform(0, total)
    for name, weight in prizes:
        point -= weight
        if point <= 0:
            return name
    return prizes[-1][0]


async def record_win(session: AsyncSession, *, contact_id: int, game: str, prize: str,
                     now: datetime) -> None:
    session.add(GameWin(contact_id=contact_id, game=game, prize=prize, created_at=now))


async def credit_referral(session: AsyncSession, *, ref: str | None, subscriber_id: int,
                          contact_id: int, now: datetime) -> bool:
    """A new subscriber who came with ``rf-<contact id>`` credits that contact once."""
    if not ref or not ref.startswith(REFERRAL_PREFIX):
        return False
    try:
        referrer = int(ref.removeprefix(REFERRAL_PREFIX))
    except ValueError:
        return False
    if referrer == contact_id:
        return False
    from bot_platform.models import Contact

    if await session.get(Contact, referrer) is None:
        return False
    result = await session.execute(insert_ignore(session, Referral).values(
        referrer_contact_id=referrer, referred_subscriber_id=subscriber_id, created_at=now))
    return bool(result.rowcount)

"""Promo games: a prize wheel with weighted prizes, stock limits, a spin allowance per
contact (plus extra spins for referrals), and prizes paid out as unique promo codes.

Every step is a compare-and-set inside the spin's transaction, so the outcome holds
whatever the interleaving (several chats, several processes, old buttons pressed again):

- the spin is counted with ``UPDATE game_spins SET spins = spins + 1 WHERE spins <
  allowed AND wins < max_wins``; the row stays locked until the turn commits, so a
  contact's concurrent spins queue behind each other;
- the outcome is decided with the prize in hand: a prize with a pool is won only if a
  code could be drawn for it (``promo.draw_code``), a prize with a stock only while its
  wins are below it (counted under a transaction lock on PostgreSQL); otherwise the wheel
  moves on to the other prizes, and announces ``out_of_prizes`` when none is left. The
  announcement never promises a code that another player took in between;
- the code is stored on the win (``game_wins.code``) and shown from there: pressing "get
  my code" again shows the same code, it never draws a second one.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import func, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from bot_platform.database import insert_ignore
from bot_platform.models import GameSpin, GameWin, Referral, Subscriber

if TYPE_CHECKING:
    from bot_platform.flows.shop_actions import PrizeSpec, SpinSpec

NO_SPINS = "no_spins"
OUT_OF_PRIZES = "out_of_prizes"
ALREADY_WON = "already_won"
REFERRAL_PREFIX = "rf-"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a spin gave: ``result`` is the prize's name or a status (``NO_SPINS``,
    ``ALREADY_WON``, ``OUT_OF_PRIZES``); ``prize`` the prize won now (or before, for
    ``ALREADY_WON``) and ``code`` the code reserved for it."""

    result: str
    prize: PrizeSpec | None = None
    code: str | None = None


def is_blank(prize: PrizeSpec) -> bool:
    """A sector that pays nothing out ("nothing this time") is not a win."""
    return prize.pool is None and prize.stock is None


async def referral_count(session: AsyncSession, contact_id: int) -> int:
    return await session.scalar(select(func.count()).where(
        Referral.referrer_contact_id == contact_id)) or 0


async def was_referred(session: AsyncSession, contact_id: int) -> bool:
    """Whether the contact joined through someone's referral link (credited once)."""
    found = await session.scalar(select(Referral.id).join(
        Subscriber, Subscriber.id == Referral.referred_subscriber_id).where(
        Subscriber.contact_id == contact_id).limit(1))
    return found is not None


async def allowance(session: AsyncSession, contact_id: int, spec: SpinSpec) -> int:
    """Spins allowed: the base, plus the bonus per friend referred and once for having been
    referred (the referral text promises both sides an extra spin)."""
    bonus_count = await referral_count(session, contact_id)
    if await was_referred(session, contact_id):
        bonus_count += 1
    return spec.max_spins + spec.referral_bonus * bonus_count


async def spins_left(session: AsyncSession, contact_id: int, spec: SpinSpec) -> int:
    """What the intro can promise: 0 once the allowance or the prizes are used up."""
    row = (await session.execute(select(GameSpin.spins, GameSpin.wins).where(
        GameSpin.contact_id == contact_id, GameSpin.game == spec.game))).first()
    spins, wins = (row.spins, row.wins) if row is not None else (0, 0)
    if spec.max_wins is not None and wins >= spec.max_wins:
        return 0
    return max(await allowance(session, contact_id, spec) - spins, 0)


async def take_spin(session: AsyncSession, *, contact_id: int, game: str, allowed: int,
                    max_wins: int | None = None) -> str | None:
    """Count one spin (compare-and-set); None when taken, else why not: ``NO_SPINS`` or
    ``ALREADY_WON`` (nothing is counted then)."""
    conditions = [GameSpin.contact_id == contact_id, GameSpin.game == game,
                  GameSpin.spins < allowed]
    if max_wins is not None:
        conditions.append(GameSpin.wins < max_wins)
    for _ in range(2):
        taken = await session.scalar(
            update(GameSpin).where(*conditions).values(spins=GameSpin.spins + 1)
            .returning(GameSpin.spins).execution_options(synchronize_session=False))
        if taken is not None:
            return None
        row = (await session.execute(select(GameSpin.spins, GameSpin.wins).where(
            GameSpin.contact_id == contact_id, GameSpin.game == game))).first()
        if row is not None:
            return ALREADY_WON if max_wins is not None and row.wins >= max_wins else NO_SPINS
        if allowed < 1:
            return NO_SPINS
        created = await session.execute(insert_ignore(session, GameSpin).values(
            contact_id=contact_id, game=game, spins=1, wins=0))
        if created.rowcount:
            return None
        # Another turn of this contact created the row first: count against it.
    return NO_SPINS


async def _stock_left(session: AsyncSession, game: str, prize: str, stock: int) -> bool:
    """Whether ``prize`` has wins left; on PostgreSQL the count is taken under a
    transaction lock per prize, so two winners cannot both take the last one (SQLite
    runs one writer at a time anyway)."""
    if session.bind.dialect.name == "postgresql":
        from bot_platform.turns import advisory_key

        await session.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                              {"key": advisory_key("game-stock", game, prize)})
    won = await session.scalar(select(func.count()).where(
        GameWin.game == game, GameWin.prize == prize))
    return (won or 0) < stock


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


async def _award(session: AsyncSession, *, contact_id: int, subscriber_id: int,
                 spec: SpinSpec, prize: PrizeSpec, now: datetime) -> Outcome | None:
    """Give ``prize`` if it can be paid out now (its code in hand); None if it cannot."""
    from bot_platform.promo import draw_code

    if prize.stock is not None and not await _stock_left(session, spec.game, prize.name,
                                                         prize.stock):
        return None
    code = None
    if prize.pool is not None:
        code = await draw_code(session, pool=prize.pool, contact_id=contact_id,
                               subscriber_id=subscriber_id, now=now, once_per_contact=False)
        if code is None:
            return None
    session.add(GameWin(contact_id=contact_id, game=spec.game, prize=prize.name, code=code,
                        created_at=now))
    if not is_blank(prize):
        counted = await session.execute(
            update(GameSpin).where(GameSpin.contact_id == contact_id,
                                   GameSpin.game == spec.game)
            .values(wins=GameSpin.wins + 1).execution_options(synchronize_session=False))
        assert counted.rowcount == 1  # the row take_spin updated, locked by this turn
    return Outcome(prize.name, prize, code)


async def spin(session: AsyncSession, *, contact_id: int, subscriber_id: int, spec: SpinSpec,
               rng: random.Random, now: datetime) -> Outcome:
    """One spin of the wheel, decided with the prize in hand (see the module docstring)."""
    refused = await take_spin(session, contact_id=contact_id, game=spec.game,
                              allowed=await allowance(session, contact_id, spec),
                              max_wins=spec.max_wins)
    if refused == ALREADY_WON:
        return await last_win(session, contact_id, spec) or Outcome(ALREADY_WON)
    if refused is not None:
        return Outcome(refused)
    # Rejection sampling: drawing among all prizes and dropping the ones that cannot be
    # paid out gives each payable prize the chance it has among the payable ones.
    candidates = [p for p in spec.prizes if p.weight > 0]
    while candidates:
        name = choose([(p.name, p.weight) for p in candidates], rng)
        prize = next((p for p in candidates if p.name == name), None)
        if prize is None:
            break
        outcome = await _award(session, contact_id=contact_id, subscriber_id=subscriber_id,
                               spec=spec, prize=prize, now=now)
        if outcome is not None:
            return outcome
        candidates.remove(prize)
    return Outcome(OUT_OF_PRIZES)


async def last_win(session: AsyncSession, contact_id: int, spec: SpinSpec) -> Outcome | None:
    """The contact's latest real prize in this game, as ``ALREADY_WON`` with its code."""
    blanks = [p.name for p in spec.prizes if is_blank(p)]
    row = (await session.execute(
        select(GameWin.prize, GameWin.code).where(
            GameWin.contact_id == contact_id, GameWin.game == spec.game,
            GameWin.prize.not_in(blanks))
        .order_by(GameWin.id.desc()).limit(1))).first()
    if row is None:
        return None
    prize = next((p for p in spec.prizes if p.name == row.prize), None)
    return Outcome(ALREADY_WON, prize, row.code)


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


"""Many subscribers' turns in one transaction: their locks taken together in a stable
order, their turns loaded with a handful of statements instead of four per subscriber.

The scheduler fires due timers in batches (``bot_platform.job_batches``): one transaction
for many subscribers' jobs. This module holds what such a batch needs from the unit of
work beside ``Turns`` (which stays the one-subscriber path):

* ``isolated_many``: the in-process FIFO locks of every identity, then the transaction,
  then the PostgreSQL advisory locks, all in one sorted order (so two batches, or a batch
  and a single turn, never wait on each other in opposite orders; the advisory locks in
  one statement);
* ``preload``: subscribers, open conversations, flow states and tags of many subscribers,
  one statement each, kept on the session for the first turn of each subscriber
  (``take_preloaded``); a handler that finds none loads the turn as usual.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING

from sqlalchemy import BigInteger, bindparam, select, text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncSession

from bot_platform.flows.turn import Position, Turn
from bot_platform.handoff import OPEN
from bot_platform.models import Conversation, FlowState, Subscriber, SubscriberTag
from bot_platform.turns import Identity, Skipped, Work, advisory_key

if TYPE_CHECKING:
    from bot_platform.turns import Turns

PRELOADED = "botp.preloaded_turns"  # session.info key: subscriber id -> Work | Skipped

_ADVISORY_LOCKS = text(
    "SELECT count(pg_advisory_xact_lock(k)) FROM unnest(:keys) AS k"
).bindparams(bindparam("keys", type_=ARRAY(BigInteger)))


@asynccontextmanager
async def isolated_many(turns: Turns,
                        identities: Iterable[Identity]) -> AsyncIterator[AsyncSession]:
    """One transaction that no other turn of any of ``identities`` runs beside (see
    ``Turns.isolated``): in-process locks in identity order, then advisory locks in key
    order, taken by one statement (``unnest`` hands the keys over in array order)."""
    ordered = sorted(set(identities))
    async with AsyncExitStack() as stack:
        for identity in ordered:
            await stack.enter_async_context(turns.locks.hold(identity))
        session = await stack.enter_async_context(turns.engine.db.session())
        if ordered and session.bind.dialect.name == "postgresql":
            keys = sorted({advisory_key(*identity) for identity in ordered})
            await session.execute(_ADVISORY_LOCKS, {"keys": keys})
        yield session


async def preload(turns: Turns, session: AsyncSession,
                  subscriber_ids: Iterable[int]) -> dict[int, Work | Skipped]:
    """The turns of many subscribers (or why flows must not act for them, as
    ``Turns.load`` answers), loaded in four statements and kept on the session for
    ``take_preloaded``. Valid until one of them changes: take each at most once, before
    any other turn of the same subscriber in this transaction."""
    ids = sorted(set(subscriber_ids))
    found: dict[int, Work | Skipped] = {}
    if not ids:
        return found
    subscribers = {s.id: s for s in (await session.scalars(
        select(Subscriber).where(Subscriber.id.in_(ids))
        .execution_options(populate_existing=True))).all()}
    talking = set((await session.scalars(select(Conversation.subscriber_id).where(
        Conversation.subscriber_id.in_(ids), Conversation.status.in_(OPEN)))).all())
    rows: dict[int, dict[str, FlowState]] = {}
    for row in (await session.scalars(select(FlowState).where(
            FlowState.subscriber_id.in_(ids)))).all():
        rows.setdefault(row.subscriber_id, {})[row.flow] = row
    tags: dict[int, set[str]] = {}
    for subscriber_id, tag in (await session.execute(select(
            SubscriberTag.subscriber_id, SubscriberTag.tag).where(
            SubscriberTag.subscriber_id.in_(ids)))).all():
        tags.setdefault(subscriber_id, set()).add(tag)
    engine = turns.engine
    for subscriber_id in ids:
        subscriber = subscribers.get(subscriber_id)
        if subscriber is None:
            found[subscriber_id] = "no-subscriber"
        elif subscriber.status != "subscribed":
            found[subscriber_id] = "unsubscribed"
        elif subscriber_id in talking:
            found[subscriber_id] = "suppressed"
        else:
            states = rows.get(subscriber_id, {})
            own_tags = tags.get(subscriber_id, set())
            turn = Turn(
                subscriber_id=subscriber.id, contact_id=subscriber.contact_id,
                channel=subscriber.channel,
                locale=subscriber.locale or engine.catalogs.default_locale,
                now=engine.clock.now(),
                attributes=dict(subscriber.attributes or {}), tags=set(own_tags),
                original_tags=own_tags,
                profile={"first_name": subscriber.first_name,
                         "last_name": subscriber.last_name,
                         "username": subscriber.username},
                positions={flow: Position(flow, row.state, row.version, row.status,
                                          dict(row.data or {}), row.updated_at)
                           for flow, row in states.items()},
                session=session, services=engine,
            )
            found[subscriber_id] = Work(turns, session, subscriber, turn, states)
    session.info.setdefault(PRELOADED, {}).update(found)
    return found


def take_preloaded(session: AsyncSession, subscriber_id: int | None) -> Work | Skipped | None:
    """The subscriber's preloaded turn, once (None: load it as usual)."""
    preloaded = session.info.get(PRELOADED)
    if not preloaded or subscriber_id is None:
        return None
    return preloaded.pop(subscriber_id, None)


def forget_preloaded(session: AsyncSession, subscriber_id: int | None) -> None:
    """A turn of this subscriber ran (or failed): what was preloaded is stale now."""
    preloaded = session.info.get(PRELOADED)
    if preloaded and subscriber_id is not None:
        preloaded.pop(subscriber_id, None)

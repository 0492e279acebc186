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
  (``take_preloaded``); a handler that finds none loads the turn as usual;
* ``save_later`` / ``save_many``: a preloaded turn is not saved by its handler but kept
  until the batch ends, then all are written together, a few statements for the batch
  (an ``executemany`` per table) instead of a flush and several statements per turn. What
  they write is what ``Turns.save`` writes, row for row.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Any

from sqlalchemy import BigInteger, and_, bindparam, delete, insert, select, text, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncSession

from bot_platform.flows.turn import JobEffect, SendEffect, TimerEffect
from bot_platform.handoff import OPEN
from bot_platform.models import Answer, Conversation, FlowState, Job, Subscriber, SubscriberTag
from bot_platform.statuses import JobStatus, PositionStatus, SubscriberStatus
from bot_platform.timers import may_have_timer, schedule_fallbacks
from bot_platform.turns import Identity, Skipped, Work, advisory_key

if TYPE_CHECKING:
    from bot_platform.turns import Turns

PRELOADED = "botp.preloaded_turns"  # session.info key: subscriber id -> Work | Skipped
DEFERRED = "botp.deferred_turns"  # session.info key: subscriber id -> Work to save

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
    for subscriber_id in ids:
        subscriber = subscribers.get(subscriber_id)
        if subscriber is None:
            found[subscriber_id] = "no-subscriber"
        elif subscriber.status != SubscriberStatus.SUBSCRIBED:
            found[subscriber_id] = "unsubscribed"
        elif subscriber_id in talking:
            found[subscriber_id] = "suppressed"
        else:
            states = rows.get(subscriber_id, {})
            turn = turns.new_turn(session, subscriber, states,
                                  tags.get(subscriber_id, set()))
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


def save_later(work: Work) -> bool:
    """Keep a preloaded turn to be saved with its batch (``save_many``); False outside a
    batch (the caller saves it now)."""
    deferred = work.session.info.get(DEFERRED)
    if deferred is None:
        return False
    deferred[work.subscriber.id] = work
    return True


def take_deferred(session: AsyncSession, subscriber_id: int | None) -> Work | None:
    """A turn of this subscriber kept for the batch's save, if any (taken once)."""
    deferred = session.info.get(DEFERRED)
    if not deferred or subscriber_id is None:
        return None
    return deferred.pop(subscriber_id, None)


def start_deferring(session: AsyncSession) -> None:
    """From now on preloaded turns of this session are saved by ``save_many``."""
    session.info[DEFERRED] = {}


_FLOW_STATES = FlowState.__table__
_UPDATE_STATE = update(_FLOW_STATES).where(_FLOW_STATES.c.id == bindparam("row_id")).values(
    state=bindparam("state"), version=bindparam("version"), status=bindparam("status"),
    data=bindparam("data"), updated_at=bindparam("updated_at"))
_SUBSCRIBERS = Subscriber.__table__
_DELETE_TAG = delete(SubscriberTag.__table__).where(
    SubscriberTag.__table__.c.subscriber_id == bindparam("sid"),
    SubscriberTag.__table__.c.tag == bindparam("old_tag"))


async def save_many(turns: Turns, session: AsyncSession) -> None:
    """Write every kept turn of the batch (``save_later``) as ``Turns.save`` would, a
    statement per kind of row for all of them. A turn with an escalation takes the usual
    path (it reads and writes the conversation)."""
    works = list(session.info.pop(DEFERRED, {}).values())
    engine = turns.engine
    bulk: list[Work] = []
    for work in works:
        if work.turn.escalation is not None:
            await work.save()
        else:
            bulk.append(work)
    if not bulk:
        return
    new_states: list[dict[str, Any]] = []
    changed_states: list[dict[str, Any]] = []
    left: dict[str, list[int]] = {}  # flow -> subscribers whose timers there are void
    new_tags: list[dict[str, Any]] = []
    old_tags: list[dict[str, Any]] = []
    attributes: list[dict[str, Any]] = []
    locales: list[dict[str, Any]] = []
    answers: list[dict[str, Any]] = []
    jobs: list[dict[str, Any]] = []
    now = max(work.turn.now for work in bulk)
    for work in bulk:
        turn, subscriber, rows = work.turn, work.subscriber, work.rows
        for flow, position in turn.positions.items():
            if not position.changed:
                continue
            row = rows.get(flow)
            values = {"state": position.state, "version": position.version,
                      "status": position.status, "data": position.data,
                      "updated_at": turn.now}
            if row is None:
                new_states.append({**values, "subscriber_id": subscriber.id, "flow": flow,
                                   "created_at": turn.now})
            else:
                changed_states.append({**values, "row_id": row.id})
                if may_have_timer(engine.flows, flow, row.state):
                    left.setdefault(flow, []).append(subscriber.id)
        new_tags.extend({"subscriber_id": subscriber.id, "tag": tag}
                        for tag in turn.tags - turn.original_tags)
        old_tags.extend({"sid": subscriber.id, "old_tag": tag}
                        for tag in turn.original_tags - turn.tags)
        if turn.attributes_changed:
            attributes.append({"sid": subscriber.id, "attributes": dict(turn.attributes),
                               "updated_at": turn.now})
        if turn.locale != (subscriber.locale or engine.catalogs.default_locale):
            locales.append({"sid": subscriber.id, "locale": turn.locale})
        answers.extend({"subscriber_id": subscriber.id, "flow": flow, "question": question,
                        "value": value, "created_at": turn.now}
                       for flow, question, value in turn.answers)
        for effect in turn.effects:
            if isinstance(effect, TimerEffect):
                position = turn.positions[effect.flow]
                if position.status == PositionStatus.ACTIVE and position.version == effect.version:
                    jobs.append({"kind": "flow_timer", "subscriber_id": subscriber.id,
                                 "flow": effect.flow, "due_at": effect.due_at,
                                 "created_at": turn.now, "payload": {
                                     "state": effect.state, "version": effect.version}})
            elif isinstance(effect, JobEffect):
                jobs.append({"kind": effect.kind, "subscriber_id": subscriber.id,
                             "flow": None, "due_at": effect.due_at, "created_at": turn.now,
                             "payload": effect.payload})
    if changed_states:
        await session.execute(_UPDATE_STATE, changed_states)
    if new_states:
        await session.execute(insert(_FLOW_STATES), new_states)
    for flow, subscriber_ids in left.items():
        # Timers of the state instances these subscribers just left are void (before the
        # new timers are inserted: those are pending too).
        await session.execute(update(Job.__table__).where(and_(
            Job.subscriber_id.in_(subscriber_ids), Job.flow == flow,
            Job.kind == "flow_timer", Job.status == JobStatus.PENDING,
        )).values(status=JobStatus.CANCELLED, finished_at=now, result="state-left"))
    if new_tags:
        await session.execute(insert(SubscriberTag.__table__), new_tags)
    if old_tags:
        await session.execute(_DELETE_TAG, old_tags)
    if attributes:
        await session.execute(update(_SUBSCRIBERS).where(
            _SUBSCRIBERS.c.id == bindparam("sid")).values(
            attributes=bindparam("attributes"), updated_at=bindparam("updated_at")),
            attributes)
    if locales:
        await session.execute(update(_SUBSCRIBERS).where(
            _SUBSCRIBERS.c.id == bindparam("sid")).values(locale=bindparam("locale")), locales)
    if answers:
        await session.execute(insert(Answer.__table__), answers)
    if jobs:
        await session.execute(insert(Job.__table__), [
            {"status": JobStatus.PENDING, "attempts": 0, **job} for job in jobs])
    sends = [[e for e in work.turn.effects if isinstance(e, SendEffect)] for work in bulk]
    queued = await engine.outbox.enqueue_many(session, [
        (work.subscriber, [(e.flow, e.message) for e in effects])
        for work, effects in zip(bulk, sends, strict=True)])
    for work, effects, rows in zip(bulk, sends, queued, strict=True):
        if any(e.fallback for e in effects):
            subscriber = work.subscriber
            schedule_fallbacks(session, subscriber, effects, rows, work.turn.now,
                               engine.capabilities(subscriber.channel, subscriber.bot_id))

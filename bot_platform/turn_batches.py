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

from sqlalchemy import (
    BigInteger,
    bindparam,
    delete,
    exists,
    null,
    or_,
    select,
    text,
    union_all,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncSession

from bot_platform import pg_driver
from bot_platform.direct import direct
from bot_platform.flows.turn import SendEffect
from bot_platform.handoff import OPEN
from bot_platform.models import Conversation
from bot_platform.statement_forms import in_ids
from bot_platform.statuses import SubscriberStatus
from bot_platform.timers import may_have_timer, schedule_fallbacks
from bot_platform.turns import (
    CANCEL_TIMERS,
    FLOW_STATES,
    INSERT_ANSWERS,
    INSERT_JOBS,
    INSERT_STATES,
    INSERT_TAGS,
    SUBSCRIBERS,
    TAGS,
    UPDATE_STATE,
    UPDATE_SUBSCRIBER,
    Identity,
    Skipped,
    StateRow,
    SubscriberRow,
    Work,
    advisory_key,
    effect_jobs,
)

if TYPE_CHECKING:
    from bot_platform.turns import Turns

PRELOADED = "botp.preloaded_turns"  # session.info key: subscriber id -> Work | Skipped
DEFERRED = "botp.deferred_turns"  # session.info key: subscriber id -> Work to save

_CONVERSATIONS = Conversation.__table__
# (The open statuses as plain parameters, not an expanding IN: Direct runs it then.)
_LOAD_SUBSCRIBERS = select(*SUBSCRIBERS.c, exists().where(
    _CONVERSATIONS.c.subscriber_id == SUBSCRIBERS.c.id,
    or_(*(_CONVERSATIONS.c.status == status for status in OPEN))).label("talking")).where(
    in_ids(SUBSCRIBERS.c.id, "ids"))
# Flow positions and tags of many subscribers in one statement (a tag row has no state
# id), as ``turns.LOAD_TURN`` loads one subscriber's.
_F, _T = FLOW_STATES.c, TAGS.c
_LOAD_POSITIONS = union_all(
    select(_F.subscriber_id, _F.flow, _F.id, _F.state, _F.version, _F.status, _F.data,
           _F.updated_at).where(in_ids(_F.subscriber_id, "ids")),
    select(_T.subscriber_id, _T.tag, null(), null(), null(), null(), null(), null())
    .where(in_ids(_T.subscriber_id, "ids")))

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
            connection = await direct(session)
            # With the transaction's BEGIN in one trip (the keys are integers: literals).
            if not (connection.adapter is not None and await pg_driver.begin_with(
                    connection.connection, connection.adapter,
                    "SELECT count(pg_advisory_xact_lock(k)) FROM unnest("
                    f"'{{{','.join(str(int(key)) for key in keys)}}}'::bigint[]) AS k")):
                await session.execute(_ADVISORY_LOCKS, {"keys": keys})
        yield session


async def preload(turns: Turns, session: AsyncSession,
                  subscriber_ids: Iterable[int]) -> dict[int, Work | Skipped]:
    """The turns of many subscribers (or why flows must not act for them, as
    ``Turns.load`` answers), loaded in two Core statements (the subscribers with whether
    humans own their chat; their flow positions and tags) and kept on the session for
    ``take_preloaded``. Valid until one of them changes: take each at most once, before
    any other turn of the same subscriber in this transaction."""
    ids = sorted(set(subscriber_ids))
    found: dict[int, Work | Skipped] = {}
    if not ids:
        return found
    connection = await direct(session)
    loaded = await connection.execute(_LOAD_SUBSCRIBERS, {"ids": ids})
    keys = loaded.keys
    at = keys.index("id")
    subscribers = {row[at]: dict(zip(keys, row, strict=True)) for row in loaded.rows}
    rows: dict[int, dict[str, StateRow]] = {}
    tags: dict[int, set[str]] = {}
    for subscriber_id, name, *values in (await connection.execute(
            _LOAD_POSITIONS, {"ids": ids})).rows:
        if values[0] is None:
            tags.setdefault(subscriber_id, set()).add(name)
        else:
            rows.setdefault(subscriber_id, {})[name] = StateRow(*values)
    for subscriber_id in ids:
        subscriber = subscribers.get(subscriber_id)
        if subscriber is None:
            found[subscriber_id] = "no-subscriber"
        elif subscriber["status"] != SubscriberStatus.SUBSCRIBED:
            found[subscriber_id] = "unsubscribed"
        elif subscriber["talking"]:
            found[subscriber_id] = "suppressed"
        else:
            states = rows.get(subscriber_id, {})
            row = SubscriberRow(subscriber)
            turn = turns.new_turn(session, row, states, tags.get(subscriber_id, set()))
            found[subscriber_id] = Work(turns, session, row, turn, states)
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


async def save_many(turns: Turns, session: AsyncSession) -> None:
    """Write every kept turn of the batch (``save_later``) as ``Turns.save`` would, a
    statement per kind of row for all of them (on SQLite they go to the database in one
    trip, with the outbox rows: ``Direct``). A turn with an escalation takes the usual
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
    left: list[dict[str, Any]] = []  # (subscriber, flow) whose pending timers are void
    new_tags: list[dict[str, Any]] = []
    old_tags: list[dict[str, Any]] = []
    attributes: list[dict[str, Any]] = []
    locales: list[dict[str, Any]] = []
    answers: list[dict[str, Any]] = []
    jobs: list[dict[str, Any]] = []
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
                changed_states.append({**values, "b_id": row.id})
                if may_have_timer(engine.flows, flow, row.state):
                    left.append({"b_sid": subscriber.id, "b_flow": flow, "b_now": turn.now})
        new_tags.extend({"subscriber_id": subscriber.id, "tag": tag}
                        for tag in turn.tags - turn.original_tags)
        old_tags.extend({"sid": subscriber.id, "old_tag": tag}
                        for tag in turn.original_tags - turn.tags)
        if turn.attributes_changed:
            attributes.append({"b_id": subscriber.id, "attributes": dict(turn.attributes),
                               "updated_at": turn.now})
        if turn.locale != (subscriber.locale or engine.catalogs.default_locale):
            locales.append({"b_id": subscriber.id, "locale": turn.locale})
        answers.extend({"subscriber_id": subscriber.id, "flow": flow, "question": question,
                        "value": value, "created_at": turn.now}
                       for flow, question, value in turn.answers)
        jobs.extend(effect_jobs(turn, subscriber.id))
    connection = await direct(session)
    with connection.deferring():  # the writes go with the outbox inserts (SQLite)
        for statement, params in (
                (UPDATE_STATE, changed_states), (INSERT_STATES, new_states),
                # the timers of the state instances left are void (before the new timers
                # are inserted: those are pending too)
                (CANCEL_TIMERS, left), (INSERT_TAGS, new_tags), (_DELETE_TAG, old_tags),
                (UPDATE_SUBSCRIBER, attributes), (UPDATE_SUBSCRIBER, locales),
                (INSERT_ANSWERS, answers), (INSERT_JOBS, jobs)):
            if params:
                await connection.write(statement, params)
        sends = [[e for e in work.turn.effects if isinstance(e, SendEffect)] for work in bulk]
        queued = await engine.outbox.enqueue_many(session, [
            (work.subscriber, [(e.flow, e.message) for e in effects])
            for work, effects in zip(bulk, sends, strict=True)])
        await connection.flush()
    for work, effects, rows in zip(bulk, sends, queued, strict=True):
        if any(e.fallback for e in effects):
            subscriber = work.subscriber
            schedule_fallbacks(session, subscriber, effects, rows, work.turn.now,
                               engine.capabilities(subscriber.channel, subscriber.bot_id))


_DELETE_TAG = delete(TAGS).where(TAGS.c.subscriber_id == bindparam("sid"),
                                 TAGS.c.tag == bindparam("old_tag"))

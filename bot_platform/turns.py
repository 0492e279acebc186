"""The unit of work per subscriber: one turn of their flows, isolated and persisted once.

    async with engine.turns.open(identity) as unit:      # lock -> transaction -> lock
        work = await engine.turns.load(unit.session, subscriber_id)
        if not isinstance(work, str):                     # subscribed, no human on it
            ...                                           # flows change work.turn
            unit.queued.extend(await work.save())         # state, timers, outbox rows
    # committed: workers woken (NOTIFY in the transaction, ``on_commit`` after it), or
    # the rows sent by this process (``Turns.sender``: ``own_replies``)

Isolation: a subscriber's turns run one after the other. In this process an ``asyncio``
lock per identity keeps them in arrival order (FIFO); across processes a
transaction-scoped PostgreSQL advisory lock does (SQLite has one writer at a time
anyway). The in-process lock is always taken before the transaction, the advisory lock
first thing in it, so two turns never wait on each other in opposite orders.

Turns that run inside a transaction the caller already isolated (a job: the scheduler
holds the subscriber's locks around it) only ``load`` and ``save``; a broadcast batch,
which holds no in-process lock, ``join``s with the advisory lock alone.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Hashable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, Protocol

from sqlalchemy import bindparam, delete, insert, literal, null, select, union_all, update
from sqlalchemy.ext.asyncio import AsyncSession

from bot_platform.direct import Direct, direct
from bot_platform.flows.turn import JobEffect, Position, SendEffect, TimerEffect, Turn
from bot_platform.handoff import open_conversation
from bot_platform.insert_claims import InsertClaim
from bot_platform.models import Answer, FlowState, Job, Subscriber, SubscriberTag
from bot_platform.outbox import INTERACTIVE, notify_workers
from bot_platform.statuses import JobStatus, PositionStatus, SubscriberStatus
from bot_platform.timers import may_have_timer, schedule_fallbacks
from bot_platform.types import Outgoing

if TYPE_CHECKING:
    from bot_platform.inbound import Engine

Identity = tuple[str, str, str]  # channel, bot id, messenger user id
Queued = tuple[int, Outgoing]  # outbox id, the part queued
Skipped = Literal["no-subscriber", "unsubscribed", "suppressed"]

# The hot path writes through the tables (SQLAlchemy Core), not the ORM: no unit of work,
# identity map or ORM bulk machinery per statement.
SUBSCRIBERS = Subscriber.__table__
FLOW_STATES = FlowState.__table__
TAGS = SubscriberTag.__table__
ANSWERS = Answer.__table__
JOBS = Job.__table__
SUBSCRIBER_COLUMNS = tuple(c.name for c in SUBSCRIBERS.columns)
# A subscriber's flow positions and tags in one statement (a tag row has no state id).
_F, _T = FLOW_STATES.c, TAGS.c
LOAD_TURN = union_all(
    select(_F.flow, _F.id, _F.state, _F.version, _F.status, _F.data, _F.updated_at)
    .where(_F.subscriber_id == bindparam("b_sid")),
    select(_T.tag, null(), null(), null(), null(), null(), null())
    .where(_T.subscriber_id == bindparam("b_sid")))
INSERT_STATES, INSERT_TAGS = insert(FLOW_STATES), insert(TAGS)
INSERT_ANSWERS, INSERT_JOBS = insert(ANSWERS), insert(JOBS)
UPDATE_SUBSCRIBER = update(SUBSCRIBERS).where(SUBSCRIBERS.c.id == bindparam("b_id"))
UPDATE_STATE = update(FLOW_STATES).where(_F.id == bindparam("b_id"))
CANCEL_TIMERS = update(JOBS).where(
    JOBS.c.subscriber_id == bindparam("b_sid"), JOBS.c.flow == bindparam("b_flow"),
    JOBS.c.kind == "flow_timer", JOBS.c.status == JobStatus.PENDING,
).values(status=JobStatus.CANCELLED, finished_at=bindparam("b_now"), result=literal("state-left"))


def effect_jobs(turn: Turn, subscriber_id: int) -> list[dict[str, Any]]:
    """The ``jobs`` rows a turn schedules: a timer for each state instance it entered and
    is still in, and the background jobs its actions asked for."""
    jobs: list[dict[str, Any]] = []
    for effect in turn.effects:
        if isinstance(effect, TimerEffect):
            position = turn.positions[effect.flow]
            if position.status == PositionStatus.ACTIVE and position.version == effect.version:
                jobs.append({"kind": "flow_timer", "subscriber_id": subscriber_id,
                             "flow": effect.flow, "due_at": effect.due_at,
                             "created_at": turn.now, "status": JobStatus.PENDING,
                             "attempts": 0, "payload": {
                                 "state": effect.state, "version": effect.version}})
        elif isinstance(effect, JobEffect):
            jobs.append({"kind": effect.kind, "subscriber_id": subscriber_id, "flow": None,
                         "due_at": effect.due_at, "created_at": turn.now,
                         "status": JobStatus.PENDING, "attempts": 0,
                         "payload": effect.payload})
    return jobs


class SubscriberRow:
    """A subscriber as plain data, read and written with Core statements (the inbound
    hot path). Attributes set on it are remembered and written by one ``UPDATE``
    (``write_subscriber``); it quacks like the ORM ``Subscriber`` where a turn needs it."""

    __slots__ = (*SUBSCRIBER_COLUMNS, "changed")
    id: int
    contact_id: int
    channel: str
    bot_id: str
    user_id: str
    status: str
    locale: str | None
    first_name: str | None
    last_name: str | None
    username: str | None
    source_ref: str | None
    attributes: dict[str, Any]
    last_inbound_at: datetime | None
    created_at: datetime
    updated_at: datetime
    changed: dict[str, Any]

    def __init__(self, values: Mapping[str, Any]) -> None:
        for name in SUBSCRIBER_COLUMNS:
            object.__setattr__(self, name, values.get(name))
        object.__setattr__(self, "changed", {})

    def __setattr__(self, name: str, value: Any) -> None:
        if getattr(self, name) != value or name == "updated_at":
            self.changed[name] = value
        object.__setattr__(self, name, value)


async def write_subscriber(connection: Direct, subscriber: Any) -> None:
    """Write what was set on a ``SubscriberRow`` since it was read (one ``UPDATE``); an
    ORM ``Subscriber`` is flushed by its session."""
    if isinstance(subscriber, SubscriberRow) and subscriber.changed:
        values = {**subscriber.changed, "b_id": subscriber.id}
        subscriber.changed.clear()
        await connection.write(UPDATE_SUBSCRIBER, values)


@dataclass(slots=True)
class StateRow:
    """A stored flow position as read (``flow_states``), the row a save updates."""

    id: int
    state: str
    version: int
    status: str
    data: dict[str, Any] | None
    updated_at: datetime | None


class KeyedLocks:
    """One FIFO ``asyncio.Lock`` per key, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[Hashable, tuple[asyncio.Lock, int]] = {}

    def users(self, key: Hashable) -> int:
        """How many hold or wait for ``key`` (0: nobody; its lock is gone)."""
        return self._locks.get(key, (None, 0))[1]

    @asynccontextmanager
    async def hold(self, key: Hashable) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users <= 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


def advisory_key(*parts: str) -> int:
    """A signed 64-bit key for ``pg_advisory_xact_lock``."""
    digest = hashlib.blake2b("\x1f".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


async def advisory_lock(session: AsyncSession, identity: Identity) -> None:
    """Hold the identity's advisory lock until the transaction ends (PostgreSQL only;
    with the transaction's ``BEGIN`` when it is the first statement)."""
    if session.bind.dialect.name == "postgresql":
        await (await direct(session)).lock(advisory_key(*identity))


def identity_of(subscriber: Subscriber | SubscriberRow) -> Identity:
    return subscriber.channel, subscriber.bot_id, subscriber.user_id


class OwnSender(Protocol):
    """Sends the rows this process's turns queue (``own_replies``), instead of waking
    the workers for them."""

    def offer(self, identity: Identity | None) -> InsertClaim | None:
        """Before a turn: what its outbox insert needs to claim its reply for this
        process (``insert_claims``); None: it does not. Passed on to ``take``."""

    async def take(self, session: AsyncSession, identity: Identity | None,
                   ids: list[int], claim: InsertClaim | None = None) -> Any:
        """In the turn's transaction, its last statement: whether this process sends
        ``ids`` (None: the workers are woken for them), and what ``taken`` needs.
        ``claim``: the turn's ``offer``, if its rows were inserted with it."""

    def taken(self, identity: Identity | None, taken: Any) -> None:
        """The turn committed: send what ``take`` took."""


@dataclass
class Unit:
    """An open unit of work: its transaction and what it queued (workers are woken for
    it when it commits, unless ``hold`` keeps the rows back for the caller)."""

    session: AsyncSession
    hold: timedelta | None = None
    queued: list[Queued] = field(default_factory=list)


@dataclass
class Work:
    """One subscriber's turn, loaded in a transaction that isolates them."""

    turns: Turns
    session: AsyncSession
    subscriber: Subscriber | SubscriberRow
    turn: Turn
    rows: dict[str, StateRow]

    async def save(self, hold: timedelta | None = None, in_reply: bool = False,
                   claim: InsertClaim | None = None) -> list[Queued]:
        """Persist the turn (see ``Turns.save``); returns the outbox rows it queued."""
        return await self.turns.save(self.session, self.subscriber, self.turn, self.rows,
                                     hold=hold, in_reply=in_reply, claim=claim)


class Turns:
    """Opens, loads and saves subscribers' turns for the engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.locks = KeyedLocks()
        # Set while this process sends its own turns' rows (``own_replies``): they are
        # handed to it after the commit, and no NOTIFY wakes the workers for them.
        self.sender: OwnSender | None = None

    @asynccontextmanager
    async def isolated(self, *identities: Identity,
                       held: bool = False) -> AsyncIterator[AsyncSession]:
        """A transaction that no other turn of these identities runs beside: in-process
        locks, then the transaction, then advisory locks. Pass several identities in a
        stable (sorted) order so two callers take them in the same order. ``held``: the
        caller holds the in-process locks already."""
        async with AsyncExitStack() as stack:
            for identity in identities if not held else ():
                await stack.enter_async_context(self.locks.hold(identity))
            session = await stack.enter_async_context(self.engine.db.session())
            for identity in identities:
                await advisory_lock(session, identity)
            yield session

    @asynccontextmanager
    async def open(self, identity: Identity | None, hold: timedelta | None = None,
                   held: bool = False) -> AsyncIterator[Unit]:
        """An isolated transaction (a plain one for ``None``) whose queued rows wake the
        workers on commit: NOTIFY for other processes, ``on_commit`` for this one. With
        ``hold``, the caller sends or releases the rows itself and nobody is woken.
        ``held``: the caller holds the identity's in-process lock already."""
        sender, taken = self.sender if hold is None else None, None
        async with self.isolated(*([identity] if identity is not None else []),
                                 held=held) as session:
            unit = Unit(session, hold)
            yield unit
            if unit.queued and hold is None:  # a turn's rows: never bulk
                ids = [i for i, _ in unit.queued]
                if sender is not None:
                    taken = await sender.take(session, identity, ids)
                if taken is None:  # the last statement
                    await notify_workers(session, INTERACTIVE, commit=True, rows=ids)
        if sender is not None and taken is not None:
            sender.taken(identity, taken)
        if hold is None:
            self.engine.on_commit()

    async def load(self, session: AsyncSession,
                   subscriber: Subscriber | SubscriberRow | int | None,
                   checked: bool = False) -> Work | Skipped:
        """The subscriber's turn, or why flows must not act for them now: gone,
        unsubscribed, or "suppressed" while humans own the chat. ``checked``: the caller
        has looked at both already (the inbound chain, a broadcast batch)."""
        if subscriber is None or isinstance(subscriber, int):
            subscriber = await session.get(Subscriber, subscriber, populate_existing=True) \
                if subscriber is not None else None
            if subscriber is None:
                return "no-subscriber"
        if not checked:
            if subscriber.status != SubscriberStatus.SUBSCRIBED:
                return "unsubscribed"
            if await open_conversation(session, subscriber.id) is not None:
                return "suppressed"  # humans own the chat: flows must not interrupt them
        turn, rows = await self._load_turn(session, subscriber)
        return Work(self, session, subscriber, turn, rows)

    async def join(self, session: AsyncSession, subscriber: Subscriber) -> Work:
        """A turn inside a transaction that holds no lock of this subscriber yet (a
        broadcast batch, which the caller already checked): the advisory lock only, as
        an in-process lock taken mid-transaction could wait on a turn that waits on us."""
        await advisory_lock(session, identity_of(subscriber))
        work = await self.load(session, subscriber, checked=True)
        assert not isinstance(work, str)
        return work

    async def _load_turn(self, session: AsyncSession, subscriber: Subscriber | SubscriberRow
                         ) -> tuple[Turn, dict[str, StateRow]]:
        connection = await direct(session)
        rows: dict[str, StateRow] = {}
        tags: set[str] = set()
        loaded = await connection.execute(LOAD_TURN, {"b_sid": subscriber.id})
        for name, *values in loaded.rows:
            if values[0] is None:
                tags.add(name)
            else:
                rows[name] = StateRow(*values)
        return self.new_turn(session, subscriber, rows, tags), rows

    def new_turn(self, session: AsyncSession, subscriber: Subscriber | SubscriberRow,
                 rows: Mapping[str, StateRow | FlowState], tags: set[str]) -> Turn:
        """A turn from what was loaded (one subscriber here, many in ``turn_batches``)."""
        engine = self.engine
        return Turn(
            subscriber_id=subscriber.id, contact_id=subscriber.contact_id,
            channel=subscriber.channel,
            locale=subscriber.locale or engine.catalogs.default_locale,
            now=engine.clock.now(),
            attributes=dict(subscriber.attributes or {}), tags=set(tags),
            original_tags=tags,
            profile={"first_name": subscriber.first_name, "last_name": subscriber.last_name,
                     "username": subscriber.username},
            positions={flow: Position(flow, row.state, row.version, row.status,
                                      dict(row.data or {}), row.updated_at)
                       for flow, row in rows.items()},
            session=session, services=engine,
        )

    async def save(self, session: AsyncSession, subscriber: Subscriber | SubscriberRow,
                   turn: Turn, rows: dict[str, StateRow], hold: timedelta | None = None,
                   in_reply: bool = False, claim: InsertClaim | None = None) -> list[Queued]:
        """Persist a turn: positions, tags, attributes, timers and outbox rows, each kind
        of row in one Core statement.

        ``in_reply``: the turn handles the customer's message, so what it sends answers it
        (``Outgoing.in_reply``); timers and shop events send proactively. ``claim``: this
        process sends the rows (``OutboxQueue.enqueue``); the caller passes it to
        ``OwnSender.take``."""
        engine = self.engine
        now = turn.now
        connection = await direct(session)
        new_states: list[dict[str, Any]] = []
        for flow, position in turn.positions.items():
            if not position.changed:
                continue
            row = rows.get(flow)
            left_timer = row is not None and may_have_timer(engine.flows, flow, row.state)
            if row is None:
                new_states.append({
                    "subscriber_id": subscriber.id, "flow": flow, "state": position.state,
                    "version": position.version, "status": position.status,
                    "data": position.data, "created_at": now, "updated_at": now})
            else:
                await connection.write(UPDATE_STATE, {
                    "b_id": row.id, "state": position.state, "version": position.version,
                    "status": position.status, "data": position.data, "updated_at": now})
                row.state, row.version, row.status = (position.state, position.version,
                                                      position.status)
                row.data, row.updated_at = position.data, now
            if not left_timer:
                continue
            # Timers of the state instance this subscriber just left are void.
            await connection.write(CANCEL_TIMERS, {
                "b_sid": subscriber.id, "b_flow": flow, "b_now": now})
        if new_states:
            await connection.write(INSERT_STATES, new_states)
        original = turn.original_tags
        added = turn.tags - original
        if added:
            await connection.write(INSERT_TAGS, [
                {"subscriber_id": subscriber.id, "tag": tag} for tag in sorted(added)])
        removed = original - turn.tags
        if removed:
            await connection.flush()  # in order with the writes before it
            await connection.connection.execute(delete(TAGS).where(
                TAGS.c.subscriber_id == subscriber.id, TAGS.c.tag.in_(removed)))
        if turn.attributes_changed:
            subscriber.attributes = dict(turn.attributes)
            subscriber.updated_at = now
        if turn.locale != (subscriber.locale or engine.catalogs.default_locale):
            subscriber.locale = turn.locale
        await write_subscriber(connection, subscriber)
        if turn.answers:
            await connection.write(INSERT_ANSWERS, [
                {"subscriber_id": subscriber.id, "flow": flow, "question": question,
                 "value": value, "created_at": now} for flow, question, value in turn.answers])
        jobs = effect_jobs(turn, subscriber.id)
        if jobs:
            await connection.write(INSERT_JOBS, jobs)
        effects = [e for e in turn.effects if isinstance(e, SendEffect)]
        sends = [(e.flow, e.message) for e in effects]
        if turn.escalation is not None:
            sends.extend(await engine.handoff.escalate(session, subscriber, turn,
                                                       engine.catalogs))
        if in_reply:
            sends = [(flow, m.model_copy(update={"in_reply": True})) for flow, m in sends]
        queued = await engine.outbox.enqueue(session, subscriber, sends, hold=hold,
                                              claim=claim)
        if any(e.fallback for e in effects):
            schedule_fallbacks(session, subscriber, effects, queued, now,
                               engine.capabilities(subscriber.channel, subscriber.bot_id))
        return queued

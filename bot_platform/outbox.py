"""The outbox: the one owner of outbox rows, from enqueue to their last status.

A row is written in the transaction of the state change that produced it (``enqueue``)
and then only moved by this module and its worker's side, ``outbox_claims``: claimed by a
delivery worker with a lease (``OutboxClaims``, on the leased queue jobs share,
``bot_platform.leases``), renewed while in hand, given the status a send result means
(``OutboxClaims.write``); released early to a worker or taken over by a webhook answer that
carries it (``OutboxQueue``), held, resumed and skipped for a broadcast or a forgotten
person (the functions below).

A subscriber's rows go out strictly in order: only the oldest unsent row of a subscriber
is claimable. Interactive rows (replies, timers, agents' messages: not a broadcast's)
are claimed first, together with any earlier row of the same subscriber that holds them
up. On PostgreSQL a commit that queued rows wakes the worker processes (``NOTIFY``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    ARRAY,
    BigInteger,
    String,
    and_,
    any_,
    bindparam,
    exists,
    func,
    null,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession

from bot_platform.bulk_inserts import insert_linked_columns
from bot_platform.clock import Clock
from bot_platform.database import Database
from bot_platform.direct import direct
from bot_platform.fitting import fit_message
from bot_platform.insert_claims import InsertClaim, insert_claimed
from bot_platform.models import Message, Outbox
from bot_platform.statement_forms import Columns
from bot_platform.statuses import MessageStatus, OutboxStatus
from bot_platform.types import Capabilities, Outgoing

log = logging.getLogger(__name__)

WORK_CHANNEL = "botp_work"  # PostgreSQL NOTIFY channel: "messages were queued"
INTERACTIVE = "interactive"  # its payload when only interactive rows were (see Worker.notify)
NAMED_ROWS = 50  # a NOTIFY names at most this many rows (a payload holds < 8,000 bytes)
Sends = Sequence[tuple[str | None, Outgoing]]  # (flow, message) pairs
# NOTIFY as a function: a statement the writes still deferred can ride with.
_NOTIFY = select(func.pg_notify(bindparam("b_channel", type_=String),
                                bindparam("b_payload", type_=String)))


async def notify_workers(session: AsyncSession, what: str = "",
                         commit: bool = False, rows: Sequence[int] = ()) -> None:
    """Wake worker processes (``LISTEN botp_work``) when this transaction commits; with
    SQLite, the worker is in this process and ``on_commit`` wakes it. ``what``:
    ``INTERACTIVE`` when only interactive rows were queued (else every loop wakes).
    ``commit``: the caller's transaction ends here (nothing runs in it after this), so
    on PostgreSQL the NOTIFY and the COMMIT may go in one trip. ``rows``: with
    ``INTERACTIVE``, the rows queued (each its subscriber's next or behind it): workers
    claim them by id (``OutboxClaims.named``)."""
    if session.bind.dialect.name == "postgresql":  # with the writes still deferred, if any
        connection = await direct(session)
        if what == INTERACTIVE and 0 < len(rows) <= NAMED_ROWS:
            what = f"{INTERACTIVE}:{','.join(str(int(i)) for i in rows)}"
        if commit and (what in _NOTIFY_COMMIT or what.startswith(f"{INTERACTIVE}:")) and (
                await connection.commit_with(  # integers only: safe as a literal
                    _NOTIFY_COMMIT.get(what) or f"SELECT pg_notify('{WORK_CHANNEL}', '{what}')")):
            return
        await connection.execute(_NOTIFY, {"b_channel": WORK_CHANNEL, "b_payload": what})


def named_rows(payload: str) -> list[int] | None:
    """The rows a NOTIFY's payload names (``notify_workers``), None when it names none."""
    head, _, ids = payload.partition(":")
    if head != INTERACTIVE or not ids:
        return None
    try:
        return [int(i) for i in ids.split(",")]
    except ValueError:
        return None


def notify_statement(rows: Sequence[int]) -> str:
    """A constant statement (for a COMMIT's trip) that wakes the workers for ``rows``,
    interactive rows of several turns (a group commit of inbound events): one NOTIFY per
    ``NAMED_ROWS`` of them, each naming its rows (``named_rows``)."""
    chunks = [rows[start:start + NAMED_ROWS] for start in range(0, len(rows), NAMED_ROWS)]
    return "SELECT " + ", ".join(  # integers only: safe as literals
        f"pg_notify('{WORK_CHANNEL}', '{INTERACTIVE}:{','.join(str(int(i)) for i in chunk)}')"
        for chunk in chunks)


# The NOTIFYs ``notify_workers`` may send with the COMMIT: constants only (a simple
# query carries no parameters).
_NOTIFY_COMMIT = {what: f"SELECT pg_notify('{WORK_CHANNEL}', '{what}')"
                  for what in ("", INTERACTIVE)}


class OutboxQueue:
    """Rows in (``enqueue``) and handed over outside a worker's claim (``release``,
    ``take_over``). One per process, shared by the engine, broadcasts and the web edge."""

    def __init__(self, db: Database, clock: Clock,
                 capabilities: Callable[[str, str], Capabilities] = lambda c, b: Capabilities(),
                 on_commit: Callable[[], None] | None = None) -> None:
        self.db = db
        self.clock = clock
        self.capabilities = capabilities
        self.on_commit = on_commit or (lambda: None)

    async def enqueue(self, session: AsyncSession, subscriber: Any, messages: Sends,
                      broadcast_id: int | None = None, hold: timedelta | None = None,
                      claim: InsertClaim | None = None) -> list[tuple[int, Outgoing]]:
        """Queue messages for delivery (fitted to the channel) in the caller's transaction.
        ``claim``: this process sends the turn's rows (``own_replies``); a single reply
        is claimed by its insert where it can be (``insert_claims``)."""
        [queued] = await self.enqueue_many(session, [(subscriber, messages)],
                                           broadcast_id=broadcast_id, hold=hold, claim=claim)
        return queued

    async def enqueue_many(self, session: AsyncSession, items: Sequence[tuple[Any, Sends]],
                           broadcast_id: int | None = None, hold: timedelta | None = None,
                           claim: InsertClaim | None = None,
                           ) -> list[list[tuple[int, Outgoing]]]:
        """``enqueue`` for many subscribers at once (a broadcast batch): two bulk inserts
        in all instead of two flushes per subscriber. Subscribers may be ORM objects or
        rows with the same attributes. Returns the queued rows per item; ``hold`` keeps
        them from the worker that long (or until ``release``); ``claim``: see
        ``enqueue``."""
        now = self.clock.now()
        queued: list[list[tuple[int, Outgoing]]] = [[] for _ in items]
        # Column by column, a shared message (a broadcast batch's) fitted once per
        # channel and its parts' columns worked out once: a row is a few appends.
        fitted: dict[tuple[int, str, str], list[tuple[Outgoing, str, str | None, Any]]] = {}
        owners: list[int] = []
        parts: list[Outgoing] = []
        subscriber_ids: list[int] = []
        channels: list[str] = []
        bot_ids: list[str] = []
        recipients: list[str] = []
        flows: list[str | None] = []
        kinds: list[str] = []
        texts: list[str | None] = []
        payloads: list[Any] = []
        for index, (subscriber, messages) in enumerate(items):
            channel, bot_id = subscriber.channel, subscriber.bot_id
            for flow, message in messages:
                key = (id(message), channel, bot_id)
                fits = fitted.get(key)
                if fits is None:
                    fits = fitted[key] = [
                        (part, "cards" if part.cards else "text", part.text or None,
                         part.model_dump(mode="json"))
                        for part in fit_message(message, self.capabilities(channel, bot_id))]
                for part, kind, text, payload in fits:
                    owners.append(index)
                    parts.append(part)
                    subscriber_ids.append(subscriber.id)
                    channels.append(channel)
                    bot_ids.append(bot_id)
                    recipients.append(subscriber.user_id)
                    flows.append(flow)
                    kinds.append(kind)
                    texts.append(text)
                    payloads.append(payload)
        message_columns = Columns({
            "subscriber_id": subscriber_ids, "channel": channels, "kind": kinds,
            "text": texts, "flow": flows}, {
            "direction": "out", "status": MessageStatus.QUEUED, "broadcast_id": broadcast_id,
            "created_at": now, "updated_at": now})
        outbox_columns = Columns({
            "subscriber_id": subscriber_ids, "channel": channels, "bot_id": bot_ids,
            "recipient": recipients, "payload": payloads}, {
            "status": OutboxStatus.PENDING, "attempts": 0,  # no Python-side default: one trip
            "next_attempt_at": now + (hold or timedelta(0)), "broadcast_id": broadcast_id,
            "created_at": now})
        linked = None
        if claim is not None and hold is None and broadcast_id is None and len(items) == 1:
            claim.subscriber = items[0][0]
            linked = await insert_claimed(session, Message, message_columns, Outbox,
                                          outbox_columns, "message_id", len(parts), claim)
        if linked is None:
            linked = await insert_linked_columns(session, Message, message_columns, Outbox,
                                                 outbox_columns, link="message_id",
                                                 count=len(parts))
        outbox_ids = linked[1]
        for index, part, outbox_id in zip(owners, parts, outbox_ids, strict=True):
            queued[index].append((outbox_id, part))
        return queued

    async def release(self, outbox_ids: Sequence[int]) -> None:
        """Hand held messages to the worker now."""
        if outbox_ids:
            async with self.db.session() as session:
                await session.execute(update(Outbox).where(
                    Outbox.id.in_(outbox_ids), Outbox.status == OutboxStatus.PENDING,
                ).values(next_attempt_at=self.clock.now()))
                await notify_workers(session, INTERACTIVE)
        self.on_commit()

    async def take_over(self, outbox_ids: Sequence[int]) -> bool:
        """Mark rows as sent in the webhook response that carries them, unless a worker
        claimed them first (then False: that worker sends them). Workers are woken as by
        ``release``: a subscriber's later rows may have waited behind these."""
        now = self.clock.now()
        try:
            async with self.db.session() as session:
                if session.bind.dialect.name == "postgresql":  # one statement, one trip
                    taken = (await (await direct(session)).execute(_TAKE_OVER, {
                        "b_ids": list(outbox_ids), "b_now": now, "b_channel": WORK_CHANNEL,
                        "b_payload": INTERACTIVE})).scalar()
                    if taken != len(outbox_ids):
                        raise _WorkerWasFaster
                    return True
                result = await session.execute(update(Outbox).where(
                    Outbox.id.in_(outbox_ids), Outbox.status == OutboxStatus.PENDING).values(
                    status=OutboxStatus.SENT, sent_at=now, last_error=None))
                if result.rowcount != len(outbox_ids):
                    raise _WorkerWasFaster
                await session.execute(update(Message).where(Message.id.in_(
                    _message_ids(Outbox.id.in_(outbox_ids)))).values(
                    status=MessageStatus.SENT, updated_at=now))
                await notify_workers(session, INTERACTIVE)
        except _WorkerWasFaster:
            return False
        finally:
            self.on_commit()
        return True


class _WorkerWasFaster(Exception):
    """Rolls a take-over back: a worker claimed some of its rows first."""


_OUTBOX, _MESSAGES = Outbox.__table__, Message.__table__
_TAKEN = update(_OUTBOX).where(
    _OUTBOX.c.id == any_(bindparam("b_ids", type_=ARRAY(BigInteger))),
    _OUTBOX.c.status == OutboxStatus.PENDING.value,
).values(status=OutboxStatus.SENT.value, sent_at=bindparam("b_now"),
         last_error=null()).returning(_OUTBOX.c.message_id).cte("taken")
# ``take_over`` on PostgreSQL: the rows, their messages and the workers' wake-up in one
# statement; how many rows were taken (all or the caller rolls back, wake-up included).
_TAKE_OVER = select(func.count(), func.pg_notify(
    bindparam("b_channel", type_=String), bindparam("b_payload", type_=String)),
).select_from(_TAKEN).add_cte(update(_MESSAGES).where(
    _MESSAGES.c.id.in_(select(_TAKEN.c.message_id))).values(
    status=MessageStatus.SENT.value, updated_at=bindparam("b_now")).cte("marked"))


def _message_ids(*where: Any) -> Any:
    return select(Outbox.message_id).where(*where).scalar_subquery()


# ---- moves in the caller's transaction ----------------------------------------------------


async def message_ids(session: AsyncSession, outbox_ids: Sequence[int]) -> list[int]:
    """The ``messages`` rows of these outbox rows (to annotate them)."""
    return list((await session.scalars(select(Outbox.message_id).where(
        Outbox.id.in_(outbox_ids)))).all())


async def of_broadcast(session: AsyncSession, outbox_ids: Sequence[int],
                       broadcast_id: int) -> None:
    """Count queued rows as a broadcast's (a flow the broadcast started sent them)."""
    if outbox_ids:
        await session.execute(update(Outbox).where(Outbox.id.in_(outbox_ids))
                              .values(broadcast_id=broadcast_id))


def broadcast_waits(broadcast_id: int) -> Any:
    """A condition: some of the broadcast's rows wait (pending or held)."""
    return exists().where(Outbox.broadcast_id == broadcast_id,
                          Outbox.status.in_(OutboxStatus.waiting()))


async def hold_broadcast(session: AsyncSession, broadcast_id: int) -> None:
    """A pause: the broadcast's rows no worker has claimed wait until ``resume``."""
    await hold_rows(session, Outbox.broadcast_id == broadcast_id)


async def hold_rows(session: AsyncSession, *where: Any) -> None:
    await session.execute(update(Outbox).where(
        *where, Outbox.status == OutboxStatus.PENDING).values(status=OutboxStatus.HELD))


async def resume_broadcast(session: AsyncSession, broadcast_id: int, now: datetime) -> None:
    await session.execute(update(Outbox).where(
        Outbox.broadcast_id == broadcast_id, Outbox.status == OutboxStatus.HELD).values(
        status=OutboxStatus.PENDING, next_attempt_at=now))


async def skip_broadcast(session: AsyncSession, broadcast_id: int, now: datetime) -> None:
    """A cancel: the broadcast's waiting rows (and their messages) are skipped."""
    await skip_rows(session, (Outbox.broadcast_id == broadcast_id,), now, "cancelled")


async def skip_subscribers(session: AsyncSession, subscriber_ids: Sequence[int],
                           now: datetime) -> None:
    """A forgotten person: nothing waiting goes out to them any more."""
    await skip_rows(session, (Outbox.subscriber_id.in_(subscriber_ids),), now, None)


async def skip_rows(session: AsyncSession, where: Sequence[Any], now: datetime,
                reason: str | None,
                statuses: Sequence[OutboxStatus] = OutboxStatus.waiting()) -> None:
    waiting = (*where, Outbox.status.in_(statuses))
    await session.execute(update(Message).where(Message.id.in_(_message_ids(*waiting)))
                          .values(status=MessageStatus.SKIPPED, updated_at=now,
                                  **({} if reason is None else {"error": reason})))
    await session.execute(update(Outbox).where(*waiting).values(
        status=OutboxStatus.SKIPPED, **({} if reason is None else {"last_error": reason})))


async def bring_forward(session: AsyncSession, subscriber_id: int, delta: timedelta,
                        now: datetime) -> int:
    """The console's ``/wait``: the subscriber's held-back rows become due ``delta``
    earlier, each by a compare-and-set on its status and old time (a worker may be on
    it). Returns how many moved."""
    moved = 0
    rows = (await session.execute(select(Outbox.id, Outbox.next_attempt_at).where(
        Outbox.subscriber_id == subscriber_id, Outbox.status == OutboxStatus.PENDING,
        Outbox.next_attempt_at > now))).all()
    for row_id, next_attempt_at in rows:
        result = await session.execute(update(Outbox).where(and_(
            Outbox.id == row_id, Outbox.status == OutboxStatus.PENDING,
            Outbox.next_attempt_at == next_attempt_at,
        )).values(next_attempt_at=max(next_attempt_at - delta, now)))
        moved += result.rowcount or 0
    return moved

"""The outbox, a worker's side: claims, leases and results.

Split from ``outbox.py`` (which writes rows and moves waiting ones) so each stays readable;
together they are the only code that changes outbox rows. A subscriber's rows go out
strictly in order: only the oldest unsent row of a subscriber is claimable. Interactive
rows (replies, timers, agents' messages: not a broadcast's) are claimed first, together
with any earlier row of the same subscriber that holds them up.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    String,
    and_,
    any_,
    bindparam,
    exists,
    func,
    literal,
    literal_column,
    or_,
    select,
    text,
    union_all,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from bot_platform import pg_driver
from bot_platform.clock import Clock
from bot_platform.config import WorkerSettings
from bot_platform.database import Database
from bot_platform.direct import direct, in_ids, run_alone
from bot_platform.leases import Leases, backoff_delay
from bot_platform.models import Broadcast, Message, Outbox, Subscriber
from bot_platform.outbox import hold_rows, skip_rows
from bot_platform.redaction import redact_secrets
from bot_platform.statuses import BroadcastStatus, MessageStatus, OutboxStatus, SubscriberStatus
from bot_platform.types import SendResult, SendStatus

log = logging.getLogger(__name__)
# Built once: a fresh ``aliased(Outbox)`` builds its column collection again whenever a
# column of it is first used, 1.7 ms per ``claimable`` (a fifth of a busy worker's claims).
_EARLIER = aliased(Outbox)


@dataclass(frozen=True, slots=True)
class ClaimedRow:
    """An outbox row this worker holds, with what delivery needs about its subscriber."""

    id: int
    message_id: int
    subscriber_id: int
    channel: str
    bot_id: str
    recipient: str
    payload: dict
    attempts: int
    subscriber_status: str
    last_inbound_at: datetime | None
    broadcast_id: int | None = None
    urgent: bool = False  # someone waits for it (an interactive row)


@dataclass(slots=True)
class Outcome:
    """What to write for one row: a send result, or a release (``release_after``)."""

    row: ClaimedRow
    result: SendResult | None
    skipped: bool = False
    release_after: float = 0.0


# Constants in the SQL, not an expanding IN: a claim compiles to one plain statement
# (``direct.run_alone``).
_UNSENT = [literal_column(f"'{status.value}'", String) for status in OutboxStatus.unsent()]
# PostgreSQL's claims in one statement: the heads' own alias (the claim's order check has
# ``_EARLIER``), and the rows of a subscriber still waiting after a claim.
_HEAD_EARLIER = aliased(Outbox, name="head_earlier")
_LATER = aliased(Outbox, name="later")
_SUBSCRIBERS = Subscriber.__table__


def _text_or_none(value: Any) -> str | None:
    """A channel's message id as the text column holds it (an adapter may hand an int)."""
    return None if value is None else str(value)


def _with_details(claim: Any) -> Any:
    """A claim (``Leases.claim_statement``) with what delivery needs about each row's
    subscriber, in one statement: their status and last inbound time, and whether more
    of their rows wait (the statement sees the rows as they were before the claim, so
    the claimed row itself is left out)."""
    claimed = claim.cte("claimed")
    more = exists().where(_LATER.subscriber_id == claimed.c.subscriber_id,
                          _LATER.status == OutboxStatus.PENDING,
                          _LATER.id != claimed.c.id)
    return select(*claimed.c, _SUBSCRIBERS.c.status, _SUBSCRIBERS.c.last_inbound_at,
                  more.label("more")).select_from(claimed.outerjoin(
                      _SUBSCRIBERS, _SUBSCRIBERS.c.id == claimed.c.subscriber_id))


# ``OutboxClaims._write_sent``: $1 the rows, $2 now, $3 their channel message ids, $4
# this worker.
_WRITE_SENT = f"""WITH done AS (
  UPDATE outbox SET status = '{OutboxStatus.SENT.value}', sent_at = $2::timestamp,
    last_error = NULL, locked_by = NULL, lease_expires_at = NULL
  FROM unnest($1::bigint[], $3::varchar[]) AS v(id, channel_message_id)
  WHERE outbox.id = v.id AND outbox.locked_by = $4
  RETURNING outbox.id, outbox.message_id, v.channel_message_id),
marked AS (
  UPDATE messages SET status = '{MessageStatus.SENT.value}',
    channel_message_id = done.channel_message_id, updated_at = $2::timestamp
  FROM done WHERE messages.id = done.message_id)
SELECT id FROM done"""

_CLAIMED_COLUMNS = (Outbox.message_id, Outbox.subscriber_id, Outbox.channel, Outbox.bot_id,
                    Outbox.recipient, Outbox.payload, Outbox.attempts, Outbox.broadcast_id)
_CLAIMED_SUBSCRIBERS = select(Subscriber.id, Subscriber.status, Subscriber.last_inbound_at
                              ).where(Subscriber.id.in_(bindparam("b_ids", expanding=True)))
_MORE_WAITING = select(Outbox.subscriber_id).where(
    Outbox.subscriber_id.in_(bindparam("b_ids", expanding=True)),
    Outbox.status == OutboxStatus.PENDING).distinct()
# Before PostgreSQL's bulk claim (see ``OutboxClaims._bulk_claim``): no plan that sorts.
_NO_SORT = text("SET LOCAL enable_sort = off")

class OutboxClaims:
    """One worker's hold on outbox rows: claims them (a subscriber's in order,
    interactive first), renews their leases and writes what became of them."""

    def __init__(self, db: Database, clock: Clock, settings: WorkerSettings,
                 worker_id: str) -> None:
        self.db = db
        self.clock = clock
        self.settings = settings
        self.worker_id = worker_id
        self.leases = Leases(db, Outbox, pending=OutboxStatus.PENDING,
                             busy=OutboxStatus.SENDING, clock=clock,
                             lease_seconds=settings.lease_seconds, worker_id=worker_id)
        # Which rows this process may claim at all (None: every row). The console uses it:
        # a ``botp chat`` user's messages are delivered only by that user's terminal.
        self.scope: Any = None
        self._statements: dict[tuple[Any, ...], Any] = {}  # see ``_statement``

    def claimable(self, now: datetime | Any, kind: str | None = None) -> Any:
        """Rows ready to be claimed (a subscriber's oldest unsent row); ``kind`` "bulk":
        only broadcasts' rows. Interactive rows are found through ``_heads``."""
        return and_(self.leases.ready(Outbox.next_attempt_at, now), self._in_order(),
                    *self._kind(kind))

    def _in_order(self) -> Any:
        """Only a subscriber's oldest unsent row."""
        earlier = _EARLIER
        return ~exists().where(
            earlier.subscriber_id == Outbox.subscriber_id, earlier.id < Outbox.id,
            earlier.status.in_(_UNSENT))

    def _kind(self, kind: str | None) -> list[Any]:
        """The scope and, for "bulk", only broadcasts' rows."""
        conditions = [] if self.scope is None else [self.scope]
        if kind == "bulk":
            conditions.append(Outbox.broadcast_id.is_not(None))
        return conditions

    def _statement(self, kind: str | None, how: str = "due") -> Any:
        """A claim built once per worker and scope, its time (``b_now``), subscriber
        (``b_sid``) or rows (``b_heads``) bound at execution. ``how``: "due" (ready rows
        of ``kind``), "heads" (the given rows, if still claimable), "of_one" (one
        subscriber's next row)."""
        return self._cached((kind, how), lambda: self._build(kind, how))

    def _cached(self, key: tuple[Any, ...], build: Callable[[], Any]) -> Any:
        """``build()``, once per ``key`` and scope (building cost more than running)."""
        key = (*key, self.scope)
        statement = self._statements.get(key)
        if statement is None:
            statement = self._statements[key] = build()
        return statement

    def _build(self, kind: str | None, how: str) -> Any:
        """The claim of ``_statement``. Ready rows on SQLite go in due order, each arm of
        ``ready`` read along the due index up to the limit (``Leases.claim_statement``).
        PostgreSQL keeps one ``WHERE`` in id order: with the split, its planner
        (statistics taken while the outbox was empty) anti-joined and sorted every
        waiting row, slower than before (80 ms against 28 ms a claim with 30,000
        waiting)."""
        now = bindparam("b_now")
        if how == "of_one":
            return self.leases.claim_statement(
                and_(Outbox.subscriber_id == bindparam("b_sid"), self.claimable(now)),
                (Outbox.id,), _CLAIMED_COLUMNS)
        if how in ("heads", "heads inside"):
            heads = (bindparam("b_heads", expanding=True) if how == "heads"
                     else self._heads(_HEAD_EARLIER))
            return self.leases.claim_statement(
                and_(Outbox.id.in_(heads),
                     self.leases.ready(Outbox.next_attempt_at, now), self._in_order(),
                     *self._kind(None)), (Outbox.id,), _CLAIMED_COLUMNS)
        if self.db.is_sqlite:
            return self.leases.claim_statement(
                and_(self._in_order(), *self._kind(kind)),
                (Outbox.next_attempt_at, Outbox.id), _CLAIMED_COLUMNS,
                any_of=self.leases.ready_arms(Outbox.next_attempt_at, now))
        if kind == "bulk":
            return self._bulk_claim(now)
        return self.leases.claim_statement(
            self.claimable(now, kind), (Outbox.id,), _CLAIMED_COLUMNS)

    def _bulk_claim(self, now: Any) -> Any:
        """PostgreSQL's claim of broadcasts' rows, in id order along
        ``ix_outbox_bulk_unsent`` (only rows still to send), whatever the statistics say.
        The statuses are literals, so even a generic plan can prove that partial index's
        predicate; the in-order check stays a per-row probe (``OFFSET 0`` keeps it from
        becoming an anti-join: re-checking a row another worker claimed meanwhile then
        costs one probe, where a hash anti-join of every unsent row was rebuilt and a
        claim took seconds); the claimed ids reach the ``UPDATE`` as an array (an index
        lookup each, not a semi-join over the table); and the claim runs with sorting
        off (``_NO_SORT``), so a planner that believes the outbox empty cannot pick
        "read every waiting row, sort them" instead."""
        pending, sending = (f"outbox.status = '{status}'" for status in OutboxStatus.unsent())
        unsent = ", ".join(f"'{status}'" for status in OutboxStatus.unsent())
        earlier = _EARLIER
        first = ~exists(select(literal(1)).where(
            earlier.subscriber_id == Outbox.subscriber_id, earlier.id < Outbox.id,
            earlier.status.in_(OutboxStatus.unsent())).offset(0))
        ready = or_(and_(text(pending), Outbox.next_attempt_at <= now),
                    and_(text(sending), Outbox.lease_expires_at < now))
        ids = select(Outbox.id).where(
            Outbox.broadcast_id.is_not(None), text(f"outbox.status IN ({unsent})"), ready,
            first, *self._kind(None)).order_by(Outbox.id).limit(
                bindparam("b_limit")).with_for_update(skip_locked=True)
        return (update(Outbox).where(Outbox.id == any_(func.array(ids.scalar_subquery())))
                .values(status=OutboxStatus.SENDING, locked_by=self.worker_id,
                        lease_expires_at=bindparam("b_until"))
                .returning(Outbox.id, *_CLAIMED_COLUMNS)
                .execution_options(synchronize_session=False))

    async def claim(self, condition: Any, limit: int, urgent: bool = False, *,
                    statement: Any = None, params: dict[str, Any] | None = None,
                    no_sort: bool = False) -> tuple[list[ClaimedRow], set[int]]:
        """Claim rows (``Leases.claim``); also returns the subscribers that have more
        rows waiting. ``statement``: a claim built by ``_statement`` instead of
        ``condition``; ``no_sort``: run it with sorting off (``_bulk_claim``), in a
        transaction of its own (``SET LOCAL``)."""
        if statement is not None and not self.db.is_sqlite and not no_sort:
            return await self._claim_alone(self._cached(
                ("alone", id(statement)), lambda: _with_details(statement)),
                limit, urgent, params or {})
        async with self.db.session(urgent=urgent) as session:
            if no_sort:
                await session.execute(_NO_SORT)
            return await self._claim_in(session, condition, limit, urgent,
                                        statement=statement, params=params)

    async def _claim_in(self, session: AsyncSession, condition: Any, limit: int,
                        urgent: bool, *, statement: Any = None,
                        params: dict[str, Any] | None = None
                        ) -> tuple[list[ClaimedRow], set[int]]:
        """``claim`` in the caller's transaction."""
        claimed = await self.leases.claim(
            session, condition, (Outbox.id,), limit, _CLAIMED_COLUMNS,
            statement=statement, params=params)
        if not claimed:
            return [], set()
        subscriber_ids = {"b_ids": list({c.subscriber_id for c in claimed})}
        subscribers = {row.id: row for row in (await session.execute(
            _CLAIMED_SUBSCRIBERS, subscriber_ids)).all()}
        more = set((await session.scalars(_MORE_WAITING, subscriber_ids)).all())
        rows = []
        for c in sorted(claimed, key=lambda c: c.id):
            sub = subscribers.get(c.subscriber_id)
            rows.append(ClaimedRow(
                c.id, c.message_id, c.subscriber_id, c.channel, c.bot_id, c.recipient,
                c.payload, c.attempts, sub.status if sub else "deleted",
                sub.last_inbound_at if sub else None, c.broadcast_id,
                urgent or c.broadcast_id is None))
        return rows, more

    async def _claim_alone(self, statement: Any, limit: int, urgent: bool,
                           params: dict[str, Any]) -> tuple[list[ClaimedRow], set[int]]:
        """PostgreSQL: a claim built by ``_with_details`` (the rows, their subscribers
        and whether more wait for them) as a transaction of its own, one round trip
        instead of five (BEGIN, the claim, two SELECTs, COMMIT)."""
        leases = self.leases
        started, until = leases.starting()
        found = (await run_alone(self.db.engine, statement, {
            **params, "b_limit": limit, "b_until": until})).rows
        leases.taken((row[0] for row in found), started, until)
        rows, more = [], set()
        for (row_id, message_id, subscriber_id, channel, bot_id, recipient, payload,
             attempts, broadcast_id, status, last_inbound_at, waiting) in sorted(found):
            rows.append(ClaimedRow(
                row_id, message_id, subscriber_id, channel, bot_id, recipient, payload,
                attempts, status if status is not None else "deleted", last_inbound_at,
                broadcast_id, urgent or broadcast_id is None))
            if waiting:
                more.add(subscriber_id)
        return rows, more

    async def claim_batch(self, limit: int, kind: str | None = None
                          ) -> tuple[list[ClaimedRow], set[int]]:
        """Claim up to ``limit`` rows: of ``kind`` ("interactive", "bulk"), or interactive
        rows first and then the rest."""
        if kind == "interactive":
            return await self._claim_interactive(limit)
        if kind is not None:
            return await self._claim_due(limit, kind)
        rows, more = await self._claim_interactive(limit)
        if len(rows) < limit:
            rest, more_rest = await self._claim_due(limit - len(rows))
            rows, more = rows + rest, more | more_rest
        return rows, more

    async def _claim_interactive(self, limit: int) -> tuple[list[ClaimedRow], set[int]]:
        """The oldest rows of subscribers with a ready interactive row (``_heads``);
        nothing is written when there are none."""
        now = self.clock.now()
        if not self.db.is_sqlite:  # the heads inside the claim: one statement
            return await self.claim(None, limit, urgent=True, statement=self._statement(
                None, "heads inside"), params={"b_now": now})
        heads_query = self._cached(("heads query",), self._heads)
        # One transaction, urgent: a reply's claim waits for the connection once, and
        # before a broadcast's claims and writes (``ConnectionGate``).
        async with self.db.session(urgent=True) as session:
            heads = list((await session.scalars(
                heads_query, {"b_limit": limit, "b_now": now})).all())
            if not heads:
                return [], set()
            return await self._claim_in(session, None, limit, True, statement=self._statement(
                None, "heads"), params={"b_now": now, "b_heads": heads})

    def _heads(self, earlier: Any = _EARLIER) -> Any:
        """The oldest unsent row of each subscriber among the first ``b_limit`` ready
        interactive rows of each arm of ``ready`` in due order (the interactive index,
        ``ix_outbox_interactive_due``): a claim reads about as many rows as it takes,
        not every waiting row (a wave of 100,000 timers made a group-by of all of them
        the costliest statement of a claim). A head may be an earlier row of a broadcast
        that holds an interactive one up; the claim then checks it is ready."""
        arms = [select(Outbox.subscriber_id).where(
            Outbox.broadcast_id.is_(None), arm, *self._kind(None)).order_by(
                Outbox.next_attempt_at, Outbox.id).limit(bindparam("b_limit")).subquery()
                for arm in self.leases.ready_arms(Outbox.next_attempt_at, bindparam("b_now"))]
        waiting = union_all(*(select(arm.c.subscriber_id) for arm in arms)).subquery()
        head = select(func.min(earlier.id)).where(
            earlier.subscriber_id == waiting.c.subscriber_id,
            earlier.status.in_(_UNSENT)).scalar_subquery()
        return select(head).select_from(waiting).distinct()

    async def _claim_due(self, limit: int, kind: str | None = None
                         ) -> tuple[list[ClaimedRow], set[int]]:
        """Ready rows of ``kind`` (see ``_statement``)."""
        return await self.claim(None, limit, statement=self._statement(kind),
                                params={"b_now": self.clock.now()},
                                no_sort=kind == "bulk" and not self.db.is_sqlite)

    async def claim_next_of(self, subscriber_id: int, urgent: bool = False
                            ) -> tuple[ClaimedRow | None, bool]:
        """The subscriber's next row, and whether yet more are waiting."""
        rows, more = await self.claim(None, 1, urgent, statement=self._statement(
            None, "of_one"), params={"b_now": self.clock.now(), "b_sid": subscriber_id})
        return (rows[0] if rows else None), subscriber_id in more

    async def write(self, outcomes: list[Outcome], urgent: bool = False) -> None:
        """Write the outcomes in one transaction: only rows this worker still holds
        change (another worker's take-over wins). ``urgent``: interactive rows' results
        (``Database.session``)."""
        now = self.clock.now()
        if not self.db.is_sqlite:
            sent = [o for o in outcomes if o.result is not None and not o.skipped
                    and o.result.status == SendStatus.SENT]
            if sent:
                await self._write_sent(sent, now)
                if len(sent) == len(outcomes):
                    return
                outcomes = [o for o in outcomes if not any(o is s for s in sent)]
        planned = [(outcome, *self._values(outcome, now)) for outcome in outcomes]
        by_values: dict[tuple, list[int]] = {}
        for outcome, outbox_values, _ in planned:
            key = tuple(sorted(outbox_values.items()))
            by_values.setdefault(key, []).append(outcome.row.id)
        async with self.db.session(urgent=urgent) as session:
            given_back = [o.row for o, values, _ in planned if o.row.broadcast_id is not None
                          and values.get("status") == OutboxStatus.PENDING]
            stopped = await self._stopped_broadcasts(session, given_back) if given_back else {}
            connection = await direct(session)
            owned: set[int] = set()
            for key, ids in by_values.items():
                owned.update(row[0] for row in (await connection.execute(
                    _result_update(tuple(column for column, _ in key)), {
                        "b_ids": ids, "b_worker": self.worker_id,
                        **{f"v_{column}": value for column, value in key}})).rows)
            if stopped:
                await self._follow_broadcasts(
                    session, [row for row in given_back if row.id in owned], stopped, now)
            by_columns: dict[tuple[str, ...], list[dict[str, Any]]] = {}
            for outcome, _, message_values in planned:
                if outcome.row.id not in owned:
                    log.warning("outbox row %s was reclaimed by another worker before we "
                                "recorded it", outcome.row.id)
                elif message_values:
                    columns = tuple(sorted(message_values))
                    by_columns.setdefault(columns, []).append(
                        {"m_id": outcome.row.message_id,
                         **{f"v_{k}": v for k, v in message_values.items()}})
            connection.defer = True  # one trip (on PostgreSQL one statement) for all
            try:
                for columns, parameters in by_columns.items():
                    await connection.write(_message_update(columns), parameters)
            finally:
                connection.defer = False
            await connection.flush()
            for outcome, _, _ in planned:
                if outcome.row.id in owned and outcome.result is not None \
                        and outcome.result.status == SendStatus.BLOCKED:
                    await self._stop_sending_to(session, outcome, now)
        for outcome, _, _ in planned:
            result = outcome.result
            if (result is not None and outcome.row.id in owned and not outcome.skipped
                    and result.status in (SendStatus.FAILED, SendStatus.BLOCKED)):
                log.warning("outbox row %s to %s/%s: %s", outcome.row.id, outcome.row.channel,
                            outcome.row.bot_id, result.reason)

    async def _write_sent(self, outcomes: list[Outcome], now: datetime) -> None:
        """PostgreSQL: rows sent (what nearly every result is), their messages with
        them, in one statement that is its own transaction: one round trip for the
        whole group instead of a session's BEGIN, an UPDATE per kind of values, the
        messages' UPDATE and COMMIT. Only rows this worker still holds change."""
        ids = [o.row.id for o in outcomes]
        naive = now.astimezone(UTC).replace(tzinfo=None) if now.tzinfo else now
        found, _ = await pg_driver.fetch_alone(self.db.engine, _WRITE_SENT, (
            ids, naive, [_text_or_none(o.result.message_id if o.result else None)
                         for o in outcomes],
            self.worker_id))
        owned = {row[0] for row in found}
        for row_id in ids:
            if row_id not in owned:
                log.warning("outbox row %s was reclaimed by another worker before we "
                            "recorded it", row_id)

    async def _stopped_broadcasts(self, session: AsyncSession, rows: list[ClaimedRow]
                                  ) -> dict[int, str]:
        """The paused or cancelled broadcasts of these rows, read under a share lock
        taken before any row is written: a pause or cancel committing now is waited for
        (and then seen); one that starts later waits for this commit and then finds the
        rows pending, so it holds or skips them itself."""
        query = select(Broadcast.id, Broadcast.status).where(
            Broadcast.id.in_({row.broadcast_id for row in rows}))
        if not self.db.is_sqlite:
            query = query.with_for_update(read=True)
        return {i: status for i, status in (await session.execute(query)).all()
                if status in (BroadcastStatus.PAUSED, BroadcastStatus.CANCELLED)}

    async def _follow_broadcasts(self, session: AsyncSession, rows: list[ClaimedRow],
                                 stopped: dict[int, str], now: datetime) -> None:
        """Broadcast rows given back to wait (a far rate-limit slot, a retry) whose
        broadcast was paused or cancelled meanwhile are held or skipped like its other
        rows, instead of being sent later."""
        for broadcast_id, status in stopped.items():
            ids = [row.id for row in rows if row.broadcast_id == broadcast_id]
            if status == BroadcastStatus.PAUSED:
                await hold_rows(session, Outbox.id.in_(ids))
            else:
                await skip_rows(session, (Outbox.id.in_(ids),), now, "cancelled",
                            (OutboxStatus.PENDING,))

    async def _stop_sending_to(self, session: AsyncSession, outcome: Outcome,
                               now: datetime) -> None:
        """Blocked: the subscriber is gone (unless this was a skip) and nothing else
        queued for them can be delivered now."""
        row = outcome.row
        if not outcome.skipped:
            await session.execute(update(Subscriber).where(
                Subscriber.id == row.subscriber_id).values(
                status=SubscriberStatus.UNSUBSCRIBED, updated_at=now))
        await skip_rows(session, (Outbox.subscriber_id == row.subscriber_id,), now,
                    "unsubscribed", (OutboxStatus.PENDING,))

    def _values(self, outcome: Outcome, now: datetime) -> tuple[dict, dict]:
        """The outbox and message columns to write for one outcome: a retry comes back
        with backoff until ``max_attempts``, a final result ends the row."""
        row, result = outcome.row, outcome.result
        outbox_values: dict = {"locked_by": None, "lease_expires_at": None}
        if result is None:
            outbox_values.update(status=OutboxStatus.PENDING, next_attempt_at=now + timedelta(
                seconds=outcome.release_after))
            return outbox_values, {}
        message_values: dict = {"updated_at": now}
        status = result.status
        if result.reason:  # adapters redact their own; this also covers third-party ones
            result = replace(result, reason=redact_secrets(result.reason))
        if status == SendStatus.SENT:
            outbox_values.update(status=OutboxStatus.SENT, sent_at=now, last_error=None)
            message_values.update(status=MessageStatus.SENT,
                                  channel_message_id=result.message_id)
        elif status == SendStatus.RETRY_AFTER:
            outbox_values.update(
                status=OutboxStatus.PENDING, last_error=result.reason,
                next_attempt_at=now + timedelta(seconds=result.retry_after or 1.0))
        elif status == SendStatus.TRANSIENT:
            attempts, settings = row.attempts + 1, self.settings
            if attempts >= settings.max_attempts:
                reason = f"gave up after {attempts} attempts: {result.reason}"
                outbox_values.update(status=OutboxStatus.FAILED, attempts=attempts,
                                     last_error=reason)
                message_values.update(status=MessageStatus.FAILED, error=reason)
            else:
                delay = backoff_delay(attempts, settings.backoff_base, settings.backoff_max)
                outbox_values.update(status=OutboxStatus.PENDING, attempts=attempts,
                                     last_error=result.reason,
                                     next_attempt_at=now + timedelta(seconds=delay))
        else:
            reason = {SendStatus.BLOCKED: "blocked", SendStatus.OUTSIDE_WINDOW:
                      "outside_window"}.get(status, "failed")
            detail = f"{reason}: {result.reason}" if result.reason else reason
            final = (OutboxStatus.SKIPPED
                     if outcome.skipped or status == SendStatus.OUTSIDE_WINDOW
                     else OutboxStatus.FAILED)
            outbox_values.update(status=final, last_error=detail)
            message_values.update(status=MessageStatus(final), error=detail)
        return outbox_values, (message_values if len(message_values) > 1 else {})


# The statements that write send results, one per set of columns written (a handful of
# kinds of outcome), built once: ``Direct`` runs them on the driver (their compiled form
# is cached per statement), not through the session's ORM-enabled execution.
_RESULT_UPDATES: dict[tuple[str, ...], Any] = {}
_MESSAGE_UPDATES: dict[tuple[str, ...], Any] = {}
_OUTBOX, _MESSAGES = Outbox.__table__, Message.__table__


def _result_update(columns: tuple[str, ...]) -> Any:
    """The outbox rows ``b_ids`` still locked by ``b_worker`` get ``v_<column>``; returns
    their ids."""
    statement = _RESULT_UPDATES.get(columns)
    if statement is None:
        statement = _RESULT_UPDATES[columns] = update(_OUTBOX).where(
            in_ids(_OUTBOX.c.id, "b_ids"), _OUTBOX.c.locked_by == bindparam("b_worker"),
        ).values({column: bindparam(f"v_{column}") for column in columns}).returning(
            _OUTBOX.c.id)
    return statement


def _message_update(columns: tuple[str, ...]) -> Any:
    """Message ``m_id`` gets ``v_<column>``."""
    statement = _MESSAGE_UPDATES.get(columns)
    if statement is None:
        statement = _MESSAGE_UPDATES[columns] = update(_MESSAGES).where(
            _MESSAGES.c.id == bindparam("m_id")).values(
            {column: bindparam(f"v_{column}") for column in columns})
    return statement

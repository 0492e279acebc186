"""The outbox, a worker's side: claims and leases (results: ``outbox_results.py``).

Split from ``outbox.py`` (which writes rows and moves waiting ones) so each stays readable;
together the three are the only code that changes outbox rows. A subscriber's rows go out
strictly in order: only the oldest unsent row of a subscriber is claimable. Interactive
rows (replies, timers, agents' messages: not a broadcast's) are claimed first, together
with any earlier row of the same subscriber that holds them up.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import datetime
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

from bot_platform.clock import Clock
from bot_platform.config import WorkerSettings
from bot_platform.database import Database
from bot_platform.direct import direct, run_alone
from bot_platform.leases import Leases
from bot_platform.models import Outbox, Subscriber
from bot_platform.outbox_results import ClaimedRow, OutboxResults, Outcome
from bot_platform.statement_forms import in_ids
from bot_platform.statuses import OutboxStatus

# Built once: a fresh ``aliased(Outbox)`` builds its column collection again whenever a
# column of it is first used, 1.7 ms per ``claimable`` (a fifth of a busy worker's claims).
_EARLIER = aliased(Outbox)


# Constants in the SQL, not an expanding IN: a claim compiles to one plain statement
# (``direct.run_alone``).
_UNSENT = [literal_column(f"'{status.value}'", String) for status in OutboxStatus.unsent()]
# PostgreSQL's claims in one statement: the rows of a subscriber still waiting after it.
_LATER = aliased(Outbox, name="later")
_SUBSCRIBERS = Subscriber.__table__


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


_CLAIMED_COLUMNS = (Outbox.message_id, Outbox.subscriber_id, Outbox.channel, Outbox.bot_id,
                    Outbox.recipient, Outbox.payload, Outbox.attempts, Outbox.broadcast_id)
_CLAIMED_SUBSCRIBERS = select(Subscriber.id, Subscriber.status, Subscriber.last_inbound_at
                              ).where(Subscriber.id.in_(bindparam("b_ids", expanding=True)))
_MORE_WAITING = select(Outbox.subscriber_id).where(
    Outbox.subscriber_id.in_(bindparam("b_ids", expanding=True)),
    Outbox.status == OutboxStatus.PENDING).distinct()
# ``claim_queued``: a turn's new rows, held by this worker if no earlier row of their
# subscriber is still unsent.
_QUEUED = Outbox.__table__
_CLAIM_QUEUED = (
    update(_QUEUED).where(
        in_ids(_QUEUED.c.id, "b_ids"), _QUEUED.c.status == OutboxStatus.PENDING.value,
        _SUBSCRIBERS.c.id == _QUEUED.c.subscriber_id,
        ~exists().where(_EARLIER.subscriber_id == _QUEUED.c.subscriber_id,
                        _EARLIER.id < _QUEUED.c.id, _EARLIER.status.in_(_UNSENT),
                        ~in_ids(_EARLIER.id, "b_mine")))
    .values(status=OutboxStatus.SENDING.value, locked_by=bindparam("b_worker"),
            lease_expires_at=bindparam("b_until"))
    .returning(_QUEUED.c.id, _QUEUED.c.message_id, _QUEUED.c.subscriber_id,
               _QUEUED.c.channel, _QUEUED.c.bot_id, _QUEUED.c.recipient, _QUEUED.c.payload,
               _QUEUED.c.attempts, _QUEUED.c.broadcast_id, _SUBSCRIBERS.c.status,
               _SUBSCRIBERS.c.last_inbound_at))
# Before PostgreSQL's bulk claim (see ``OutboxClaims._bulk_claim``): no plan that sorts.
_NO_SORT = text("SET LOCAL enable_sort = off")
_FEW_HEADS = 4  # PostgreSQL claims up to this many named rows as scalar parameters


class OutboxClaims:
    """One worker's hold on outbox rows: claims them (a subscriber's in order,
    interactive first) and renews their leases; ``results`` writes what became of them."""

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
        self.results = OutboxResults(db, clock, settings, worker_id)
        # PostgreSQL: rows a turn's NOTIFY named (``named``), claimed by id without the
        # heads query until something else may be waiting (``_heads_due``).
        self._named: set[int] = set()
        self._heads_due = True
        self._heads_at = 0.0  # monotonic time of the last claim through the heads query
        self.share = (0, 1)  # this worker's place among those listening, and how many

    def named(self, ids: Sequence[int] | None) -> bool:
        """A NOTIFY said rows were queued: ``ids`` are those rows (one turn's: one
        subscriber's, each its head or behind one), None when it did not say which. The
        next interactive claim takes named rows by id, one statement instead of two (the
        heads query read every ready row's subscriber, in every worker). Of ``share``
        workers listening, one takes a turn's rows (by its first row's id): the others'
        claims would find nothing. False: nothing to claim here."""
        if ids is None:
            self._heads_due = True
            return True
        index, count = self.share
        if not ids or min(ids) % count != index:
            return False  # another worker's (if it is gone, a heads query finds them)
        self._named.update(ids)
        return True

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

    def _named_ready(self, now: Any) -> Any:
        """Ready and its subscriber's oldest unsent row, for a claim that names its rows
        (by id, by subscriber). PostgreSQL: ``Leases.ready_of_found``, and the in-order
        check a probe per row (``OFFSET 0``): a prepared statement's generic plan lives
        as long as its connection, and one made while the outbox was small
        materialized the whole table for it, once per claim ever after."""
        if self.db.is_sqlite:
            return and_(self.leases.ready(Outbox.next_attempt_at, now), self._in_order())
        earlier = _EARLIER
        first = ~exists(select(literal(1)).where(
            earlier.subscriber_id == Outbox.subscriber_id, earlier.id < Outbox.id,
            earlier.status.in_(_UNSENT)).offset(0))
        return and_(self.leases.ready_of_found(Outbox.next_attempt_at, now), first)

    def _kind(self, kind: str | None) -> list[Any]:
        """The scope and, for "bulk", only broadcasts' rows."""
        conditions = [] if self.scope is None else [self.scope]
        if kind == "bulk":
            conditions.append(Outbox.broadcast_id.is_not(None))
        return conditions

    def _statement(self, kind: str | None, how: str = "due") -> Any:
        """A claim built once per worker and scope, its time (``b_now``), subscriber
        (``b_sid``) or rows (``b_heads``) bound at execution. ``how``: "due" (ready rows
        of ``kind``), "heads" (the given rows, if still claimable; "heads2":
        two of them, ``b_head0`` and ``b_head1``), "of_one" (one subscriber's next row)."""
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
                and_(Outbox.subscriber_id == bindparam("b_sid"), self._named_ready(now),
                     *self._kind(None)), (Outbox.id,), _CLAIMED_COLUMNS)
        if how.startswith("heads"):  # PostgreSQL: an array or up to four scalars, alone
            few = int(how[5:] or 0)  # "heads3": b_head0 .. b_head2 (``_claim_heads``)
            heads = (Outbox.id.in_(bindparam("b_heads", expanding=True)) if self.db.is_sqlite
                     else Outbox.id.in_([bindparam(f"b_head{n}") for n in range(few)]) if few
                     else in_ids(Outbox.id, "b_heads"))
            return self.leases.claim_statement(
                and_(heads, self._named_ready(now), *self._kind(None)),
                (Outbox.id,), _CLAIMED_COLUMNS)
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
        heads_query = self._cached(("heads query",), self._heads)
        if not self.db.is_sqlite and self._named and not self._heads_due and (
                time.monotonic() - self._heads_at < self.settings.poll_interval):
            # Only named rows can be new: a row named but not claimed was taken by
            # another worker, or waits behind an earlier row of its subscriber (then
            # the claim of that row says "more", or the next heads query finds it: a
            # poll, or whatever did not name its rows, brings one within a poll).
            named = sorted(self._named)[:limit]
            self._named.difference_update(named)
            return await self._claim_heads(named, limit, now)
        if not self.db.is_sqlite:
            self._named.clear()  # the heads query finds them (or they are gone)
            self._heads_due, self._heads_at = False, time.monotonic()
            # Two statements, each alone. One statement with the heads inside the claim
            # was planned as a scan of every waiting row per head: with a wave of 20,000
            # due timers each claim ran 12-20 s and deliveries stalled (200 delivered of
            # 61,300 fired in 60 s, ``bench/scheduler.py``).
            heads = [row[0] for row in (await run_alone(
                self.db.engine, heads_query, {"b_limit": limit, "b_now": now})).rows
                if row[0] is not None]
            if not heads:
                return [], set()
            return await self._claim_heads(heads, limit, now)
        # One transaction, urgent: a reply's claim waits for the connection once, and
        # before a broadcast's claims and writes (``ConnectionGate``).
        async with self.db.session(urgent=True) as session:
            heads = list((await session.scalars(
                heads_query, {"b_limit": limit, "b_now": now})).all())
            if not heads:
                return [], set()
            return await self._claim_in(session, None, limit, True, statement=self._statement(
                None, "heads"), params={"b_now": now, "b_heads": heads})

    async def _claim_heads(self, heads: list[int], limit: int, now: datetime
                           ) -> tuple[list[ClaimedRow], set[int]]:
        """PostgreSQL: claim the given rows, if still claimable. Up to ``_FEW_HEADS``
        (a turn's replies) go as that many parameters, one statement per count: the
        array form's generic plan is costed for ten ids, so the server planned it afresh
        for every claim of one to three (0.4 ms each, more than the claim ran)."""
        if len(heads) <= _FEW_HEADS:
            return await self.claim(None, limit, urgent=True, statement=self._statement(
                None, f"heads{len(heads)}"), params={
                    "b_now": now, **{f"b_head{n}": head for n, head in enumerate(heads)}})
        return await self.claim(None, limit, urgent=True, statement=self._statement(
            None, "heads"), params={"b_now": now, "b_heads": heads})

    def _heads(self) -> Any:
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
        earlier = _EARLIER
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

    async def claim_queued(self, session: AsyncSession, ids: Sequence[int],
                           ahead: Sequence[int] = ()
                           ) -> tuple[list[ClaimedRow], float, datetime]:
        """Claim rows a turn just queued, in its transaction (``own_replies``), each if no
        row of its subscriber before it is unsent but the turn's own and ``ahead`` (rows
        this worker holds and sends first): a prefix of ``ids`` (the rest wait for a
        worker, as before). The subscriber's advisory lock is held, and the statement
        sees every row committed before it, as a worker's claim would. Returns the rows
        (with their subscriber as this transaction left it) and, for ``Leases.taken``
        once the transaction committed, when the claim began and the lease it stamped."""
        started, until = self.leases.starting()
        found = (await (await direct(session)).execute(_CLAIM_QUEUED, {
            "b_ids": list(ids), "b_mine": [*ids, *ahead], "b_worker": self.worker_id,
            "b_until": until})).rows
        return [ClaimedRow(row_id, message_id, subscriber_id, channel, bot_id, recipient,
                           payload, attempts, status, last_inbound_at, broadcast_id, True)
                for (row_id, message_id, subscriber_id, channel, bot_id, recipient, payload,
                     attempts, broadcast_id, status, last_inbound_at) in sorted(found)
                ], started, until

    async def claim_next_of(self, subscriber_id: int, urgent: bool = False
                            ) -> tuple[ClaimedRow | None, bool]:
        """The subscriber's next row, and whether yet more are waiting."""
        rows, more = await self.claim(None, 1, urgent, statement=self._statement(
            None, "of_one"), params={"b_now": self.clock.now(), "b_sid": subscriber_id})
        return (rows[0] if rows else None), subscriber_id in more

    async def write(self, outcomes: list[Outcome], urgent: bool = False) -> None:
        """What became of claimed rows (``OutboxResults.write``)."""
        await self.results.write(outcomes, urgent)

"""The leased queue that jobs and the outbox share: how a worker takes rows so that each
is worked on by one worker at a time, and a dead worker's rows come back.

A claim is one ``UPDATE ... RETURNING`` over the ids of ready rows (``FOR UPDATE SKIP
LOCKED`` on PostgreSQL, so many workers share a table); it marks them busy with the
worker's id and a lease. A row whose lease expired is ready again for any worker.

A worker works only on what it still owns. Every claim (and every renewal by the
heartbeat) gives the row a deadline on this process's boot clock: the moment taken
*before* the claim statement was issued, plus the lease, minus a safety margin. Right
before acting outside the database (a messenger call) the holder asks ``owns``: a row
whose deadline passed (the process was frozen, SIGSTOP, a swap storm: the boot clock
keeps running meanwhile) is dropped, because another worker may already have taken it
over. The stamped ``lease_expires_at`` (minus the margin) is checked against the wall
clock as well, the clock other workers judge the lease by: it also catches a
whole-machine pause that a monotonic clock may not see. No round trip.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, bindparam, case, false, or_, select, union_all, update
from sqlalchemy.ext.asyncio import AsyncSession

from bot_platform.clock import Clock
from bot_platform.database import Database

# A row is worked on only if at least this long (at most a quarter lease) is left of its
# lease: room for the clocks of two workers' hosts to disagree and for a request to leave.
LEASE_MARGIN = 2.0

_BOOT_CLOCK = getattr(time, "CLOCK_BOOTTIME", None)

Deadline = tuple[float, datetime]  # (boot clock, wall clock) until which a row is ours


def boot_clock() -> float:
    """Seconds on a clock that never jumps and keeps running while this process is
    stopped (SIGSTOP) and while the machine sleeps (``CLOCK_BOOTTIME`` on Linux;
    ``time.monotonic`` elsewhere, which also runs through a SIGSTOP)."""
    return time.clock_gettime(_BOOT_CLOCK) if _BOOT_CLOCK is not None else time.monotonic()


def backoff_delay(attempt: int, base: float, ceiling: float) -> float:
    """Exponential backoff with full jitter (attempt 1 -> up to ``base`` seconds)."""
    return random.uniform(base / 2, min(ceiling, base * 2 ** (attempt - 1)))


class Leases:
    """One worker's leases on the rows of one table (``model`` has ``status``,
    ``locked_by`` and ``lease_expires_at``): claim, renew, and whether a row is still
    surely ours."""

    def __init__(self, db: Database, model: Any, *, pending: str, busy: str, clock: Clock,
                 lease_seconds: float, worker_id: str) -> None:
        self.db = db
        self.model = model
        self.pending = pending
        self.busy = busy
        self.clock = clock
        self.lease_seconds = lease_seconds
        self.worker_id = worker_id
        # Rows claimed and still being worked on here, with their deadlines: only these
        # have their leases renewed, so a row whose handling died without a result is
        # taken over once its lease expires.
        self.in_hand: dict[int, Deadline] = {}
        self.monotonic: Callable[[], float] = boot_clock  # tests hand in their own

    def ready(self, due: Any, now: datetime) -> Any:
        """Rows waiting and due (``due`` is their due-time column), or whose holder's
        lease expired."""
        expired, due_now = self.ready_arms(due, now)
        return or_(due_now, expired)

    def ready_arms(self, due: Any, now: datetime) -> tuple[Any, Any]:
        """``ready`` as its two arms, each one range of a ``(status, due)`` index: busy
        past its lease first (a claim takes those before the due rows of a big queue)."""
        model = self.model
        return (and_(model.status == self.busy, model.lease_expires_at < now),
                and_(model.status == self.pending, due <= now))

    def ready_of_found(self, due: Any, now: datetime) -> Any:
        """``ready`` for a claim that finds its rows by another key (their ids, their
        subscriber): one ``CASE`` on the status, which no ``(status, due)`` index can
        serve. With ``ready``'s ``OR`` PostgreSQL read the named rows through that index
        instead (a bitmap of every waiting row's entries, and the entries of rows since
        sent, which only VACUUM removes: 4,000 entries and 165 buffers for a claim of
        one row after a minute of ``bench/inbound.py``, 0.4 ms of the server's CPU per
        update)."""
        model = self.model
        return case((model.status == self.busy, model.lease_expires_at < now),
                    (model.status == self.pending, due <= now), else_=false())

    def claim_statement(self, condition: Any, order_by: Sequence[Any],
                        columns: Sequence[Any], any_of: Sequence[Any] = ()) -> Any:
        """The claim of ``claim`` as one statement, its limit and lease end bound at
        execution (``b_limit``, ``b_until``): a caller that claims the same way again and
        again builds it once (building it cost more than running it).

        Each of ``any_of`` is read on its own, up to the limit in order (``UNION ALL``):
        given the arms of ``ready_arms`` and an ``order_by`` the ``(status, due)`` index
        holds, a claim reads about as many rows as it takes. With their ``OR`` in one
        ``WHERE``, SQLite read and sorted every waiting row for each claim (30,000 for a
        30,000-recipient broadcast: 40 ms of CPU to claim 100 rows)."""
        model = self.model
        arms = []
        for arm in [and_(condition, alternative) for alternative in any_of] or [condition]:
            query = select(model.id).where(arm).order_by(*order_by).limit(
                bindparam("b_limit"))
            if not self.db.is_sqlite:
                query = query.with_for_update(skip_locked=True)
            arms.append(query)
        ids = arms[0] if len(arms) == 1 else union_all(
            *(select(query.subquery().c.id) for query in arms)).limit(bindparam("b_limit"))
        return (update(model).where(model.id.in_(ids.scalar_subquery()))
                .values(status=self.busy, locked_by=self.worker_id,
                        lease_expires_at=bindparam("b_until"))
                .returning(model.id, *columns)
                .execution_options(synchronize_session=False))

    async def claim(self, session: AsyncSession, condition: Any, order_by: Sequence[Any],
                    limit: int, columns: Sequence[Any], statement: Any = None,
                    params: dict[str, Any] | None = None) -> list[Any]:
        """Take up to ``limit`` rows matching ``condition`` in ``order_by`` order, in the
        caller's transaction; returns ``id`` and ``columns`` of each. ``statement``: one
        from ``claim_statement`` (``condition`` is then not used), with ``params`` for its
        own bind parameters."""
        started, until = self.starting()
        if statement is None:
            statement = self.claim_statement(condition, order_by, columns)
        claimed = (await session.execute(statement, {
            **(params or {}), "b_limit": limit, "b_until": until})).all()
        self.taken((row.id for row in claimed), started, until)
        return list(claimed)

    def starting(self) -> tuple[float, datetime]:
        """For a claim about to be issued: the boot clock now (see ``owns``) and the
        lease end to stamp (``b_until``)."""
        return self.monotonic(), self.clock.now() + timedelta(seconds=self.lease_seconds)

    def taken(self, ids: Iterable[int], started: float, until: datetime) -> None:
        """Rows a claim begun at ``starting()`` took: in hand until their deadline."""
        deadline = self._deadline(started, until)
        self.in_hand.update((row_id, deadline) for row_id in ids)

    def _deadline(self, started: float, stamped: datetime) -> Deadline:
        """Until when a lease stamped ``stamped`` by a statement issued after ``started``
        (boot clock) is surely still ours, on either clock."""
        margin = min(LEASE_MARGIN, self.lease_seconds / 4)
        return started + self.lease_seconds - margin, stamped - timedelta(seconds=margin)

    def owns(self, row_id: int) -> bool:
        """Whether this worker surely still holds the row: asked right before acting."""
        deadline = self.in_hand.get(row_id)
        return (deadline is not None and self.monotonic() < deadline[0]
                and self.clock.now() < deadline[1])

    def let_go(self, row_id: int) -> None:
        """The row is finished here (or dropped): its lease is renewed no more."""
        self.in_hand.pop(row_id, None)

    async def renew(self) -> int:
        """Extend the lease of every row in hand: a lease expires when its holder is dead
        (or dropped the row), not when it is slow. A renewed row's deadline moves only as
        far as the renewal proves; a row not renewed keeps its deadline (it is no longer
        ours, or no longer in hand). Returns how many rows were renewed."""
        held = dict(self.in_hand)
        started = self.monotonic()
        until = self.clock.now() + timedelta(seconds=self.lease_seconds)
        renewed = await self._extend(held, until)
        deadline = self._deadline(started, until)
        for row_id in renewed:
            if self.in_hand.get(row_id) == held[row_id]:  # not finished nor re-claimed since
                self.in_hand[row_id] = deadline
        return len(renewed)

    async def _extend(self, ids: Collection[int], until: datetime) -> set[int]:
        """Move to ``until`` the leases of ``ids`` this worker still holds busy; returns
        the ids extended (the others are no longer this worker's)."""
        if not ids:
            return set()
        model = self.model
        async with self.db.session() as session:
            renewed = await session.scalars(update(model).where(
                model.id.in_(list(ids)), model.locked_by == self.worker_id,
                model.status == self.busy,
            ).values(lease_expires_at=until).returning(model.id)
                .execution_options(synchronize_session=False))
            return set(renewed.all())

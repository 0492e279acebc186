"""A web process's own replies: on PostgreSQL, ``botp web`` sends the rows its own turns
queue, as ``botp run`` does in one process, instead of handing each turn to a worker.

Why: the hand-over (a NOTIFY, every worker's LISTEN, a worker's claim by id, the send,
its result) cost more CPU than the send itself: on the project's 2-core machine one
``botp run`` process on PostgreSQL answered more updates/s than ``botp web`` + 2 workers
(``bench/README.md``).

How: a turn's rows are claimed by the turn's own transaction, under the subscriber's
advisory lock, when no earlier row of the subscriber is unsent but those this process is
sending for the same subscriber right now: no NOTIFY, no claim of their own. An inbound
event's single reply is claimed by the statement that inserts it (``offer``,
``insert_claims``); other rows by the turn's last statement before the commit
(``OutboxClaims.claim_queued``). Once committed they join that
subscriber's line here and are sent in order (``Delivery.deliver``). A row that does not
go out (a retry, a put-back, a lease lapsed) ends the line: every row behind it goes
back to the workers (pending, behind it), and so do the rows of a turn that counted on
it and had not committed yet. Otherwise (an earlier row is a worker's: a timer's
message, a broadcast's) the turn wakes the workers as before. Timers, broadcasts and
retries stay with the workers.

Leases as everywhere: a row is sent only while its lease is surely still this
process's (``Delivery``), renewed while in hand. A web frozen past its lease sends
nothing a worker has taken over; a web that dies after the commit leaves rows a worker
sends once their lease expires; no transaction is open across a messenger call.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from bot_platform.database import Database
from bot_platform.delivery import Delivery
from bot_platform.insert_claims import InsertClaim
from bot_platform.outbox import INTERACTIVE, notify_workers
from bot_platform.outbox_results import ClaimedRow
from bot_platform.pipeline import wait_any
from bot_platform.turns import Identity, Turns
from bot_platform.types import SendStatus

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Held:
    """A turn's rows its transaction claimed, and whether that counted on rows this
    process was sending (``behind``: then as of which failure, ``seen``)."""

    rows: list[ClaimedRow]
    started: float
    until: datetime
    behind: bool
    seen: int


@dataclass(slots=True)
class _Line:
    """One subscriber's rows held here, sent one after the other by one task."""

    turns: deque[list[ClaimedRow]] = field(default_factory=deque)
    held: set[int] = field(default_factory=set)  # ids queued or being sent


class OwnReplies:
    """Sends the rows this process's turns queue (``Turns.sender``) while ``run`` runs."""

    def __init__(self, turns: Turns, delivery: Delivery, db: Database) -> None:
        self.turns = turns
        self.delivery = delivery
        self.db = db
        self._lines: dict[Identity, _Line] = {}
        # Lines that ended on a row not sent: identity -> the failure's number, so a
        # turn that counted on that line and commits afterwards gives its rows back.
        self._failures = 0
        self._failed: dict[Identity, tuple[int, float]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._semaphore = asyncio.Semaphore(delivery.settings.concurrency)
        self._running = False

    # ---- in the turn (``Turns.open``) ---------------------------------------------------

    def offer(self, identity: Identity | None) -> InsertClaim | None:
        """Before a turn: its reply may be claimed by its insert (``insert_claims``),
        counting on the rows of the subscriber's line here (and on the line not failing
        before the turn commits: ``seen``)."""
        if not self._running or identity is None:
            return None
        outbox = self.delivery.outbox
        started, until = outbox.leases.starting()
        return InsertClaim(outbox.worker_id, self._ahead(identity), self._failures, started,
                           until)

    def _ahead(self, identity: Identity) -> list[int]:
        """The rows of the subscriber's line here: a turn's rows may go behind them."""
        line = self._lines.get(identity)
        return sorted(line.held) if line is not None else []

    async def take(self, session: AsyncSession, identity: Identity | None,
                   ids: list[int], claim: InsertClaim | None = None) -> _Held | None:
        """Claim the turn's rows in its transaction, unless a row of the subscriber
        before them is unsent and not in this process's line: then None (the workers
        are woken). Rows their insert claimed (``claim``) are taken as they are."""
        if not self._running or identity is None:
            return None
        if claim is not None and claim.decided:
            rows, started, until = await self._claimed(session, ids, claim)
            ahead, seen = claim.ahead, claim.seen
        else:
            ahead = self._ahead(identity)
            seen = self._failures  # before the claim: a failure meanwhile voids it
            rows, started, until = await self.delivery.outbox.claim_queued(
                session, ids, ahead)
        if not rows:
            return None
        if len(rows) < len(ids):  # behind a row queued meanwhile: a worker's
            claimed = {row.id for row in rows}
            await notify_workers(session, INTERACTIVE,
                                 rows=[i for i in ids if i not in claimed])
        return _Held(rows, started, until, bool(ahead), seen)

    async def _claimed(self, session: AsyncSession, ids: list[int], claim: InsertClaim
                       ) -> tuple[list[ClaimedRow], float, datetime]:
        """The rows the insert claimed, and any of ``ids`` it did not insert claimed by
        ``claim_queued`` (behind those; a row the insert left pending stays ahead of
        them)."""
        rows = claim.rows()
        rest = [i for i in ids if i not in claim.decided]
        if not rest:
            return rows, claim.started, claim.until
        more, _, until = await self.delivery.outbox.claim_queued(
            session, rest, [*claim.ahead, *(row.id for row in rows)])
        return sorted([*rows, *more], key=lambda row: row.id), claim.started, min(
            until, claim.until)

    def taken(self, identity: Identity | None, taken: _Held) -> None:
        """The turn committed: its rows join the subscriber's line (or, if the line they
        counted on failed meanwhile, go back to the workers)."""
        assert identity is not None
        ids = [row.id for row in taken.rows]
        self.delivery.outbox.leases.taken(ids, taken.started, taken.until)
        failed = self._failed.get(identity)
        if taken.behind and failed is not None and failed[0] > taken.seen:
            self._start(self._give_back(taken.rows, hand_over=True))
            return
        line = self._lines.get(identity)
        if line is None:
            line = self._lines[identity] = _Line()
            self._start(self._run_line(identity, line))
        line.turns.append(taken.rows)
        line.held.update(ids)

    # ---- sending ------------------------------------------------------------------------

    def _start(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("sending a turn's rows failed", exc_info=task.exception())

    async def _run_line(self, identity: Identity, line: _Line) -> None:
        """The subscriber's held rows in order, until the line is empty or a row does
        not go out (then the rest go back to the workers)."""
        rest: list[ClaimedRow] = []
        try:
            while line.turns:
                rows = line.turns.popleft()
                for index, row in enumerate(rows):
                    try:
                        status = await self.delivery.deliver(row, self._semaphore)
                    finally:
                        line.held.discard(row.id)
                    if status != SendStatus.SENT:
                        rest = [*rows[index + 1:], *(r for turn in line.turns for r in turn)]
                        line.turns.clear()
                        self._fail(identity)
                        break
                if rest:
                    break
        except BaseException:
            rest = [r for turn in line.turns for r in turn]
            line.turns.clear()
            self._fail(identity)
            raise
        finally:
            if self._lines.get(identity) is line:
                del self._lines[identity]
            line.held.clear()
            if rest:
                await self._give_back(rest, hand_over=False)

    def _fail(self, identity: Identity) -> None:
        """Remember that the line failed (for turns committing on it), for a lease."""
        self._failures += 1
        now = time.monotonic()
        keep = self.delivery.settings.lease_seconds
        self._failed = {key: value for key, value in self._failed.items()
                        if now - value[1] < keep}
        self._failed[identity] = (self._failures, now)
        if self._lines.get(identity) is not None:
            del self._lines[identity]  # later turns no longer count on it

    async def _give_back(self, rows: list[ClaimedRow], hand_over: bool) -> None:
        """Held rows this process will not send: pending again (behind the row that did
        not go out, which goes first), for the workers."""
        for row in rows:
            try:
                if self.delivery.owns(row):
                    await self.delivery.release(row, 0.0)
            finally:
                self.delivery.outbox.leases.let_go(row.id)
                self.delivery.pressure.sent(row.id)
        if hand_over:
            await self._hand_over([row.id for row in rows])

    async def _hand_over(self, ids: list[int]) -> None:
        """Wake the workers for rows this process does not send (named, as a turn's
        commit names them; without a NOTIFY their polls find them within a poll)."""
        try:
            async with self.db.session(urgent=True) as session:
                await notify_workers(session, INTERACTIVE, commit=True, rows=ids)
        except Exception as error:
            log.warning("waking the workers for %d rows failed (%s: %s); their polls "
                        "find them", len(ids), type(error).__name__, error)

    # ---- the process's life -------------------------------------------------------------

    async def run(self, stop: asyncio.Event, grace: float) -> None:
        """Take this process's turns' rows until ``stop``, renewing the leases of those in
        hand; then what is in hand may finish for ``grace`` seconds, and parked rows go
        to the workers."""
        self._running = True
        self.turns.sender = self
        try:
            every = self.delivery.settings.lease_seconds / 4
            while not stop.is_set():
                await wait_any(every, stop)
                try:
                    await self.delivery.renew_leases()
                except Exception as error:  # the database may be away: the next beat
                    log.warning("renewing leases failed: %s: %s", type(error).__name__,
                                error)
        finally:
            self._running = False
            self.turns.sender = None
            if self._tasks:
                await asyncio.wait(list(self._tasks), timeout=grace)

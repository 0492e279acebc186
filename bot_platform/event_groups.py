"""Group commit of inbound events: turns that arrive together share one transaction.

Why: every event paid for a transaction of its own: on SQLite (one writer, one pooled
connection) a session, a checkout, ``BEGIN IMMEDIATE`` and ``COMMIT`` each time, queued
behind the delivery worker's transactions for the one connection; on PostgreSQL a
commit (a WAL flush) and a NOTIFY per event. Events that are ready together now take
turns inside one transaction, each in a SAVEPOINT of its own:

- a bad event is rolled back to its savepoint and raises as before (its webhook is
  answered with an error and the messenger sends it again); its neighbours commit;
- a caller returns only once the shared transaction committed: an answered webhook is
  still a durable one. The caller holds its subscriber's in-process lock until then
  (``Engine.step_transaction``), so a subscriber's next event never joins a group before
  the previous one committed: order and dedupe are what they were;
- when the transaction itself is lost under an event (an ORM flush error, SQLite rolled
  the whole of it back, a connection lost), the events that had finished in it run
  again in the next group; the bad one raises.

An event's RELEASE goes with the next event's SAVEPOINT, before that event runs
anything (on SQLite as statements in the loop's thread: ``Direct``).

PostgreSQL: other processes (another ``web``, the workers' timer batches and broadcast
batches) lock subscribers too, by advisory lock, and a group must never wait for one
inside its shared transaction: it holds the locks of the events before, and the holder
may be waiting for one of those (a deadlock). So an event joins with
``pg_try_advisory_xact_lock`` (in its SAVEPOINT's trip): when its subscriber is busy
elsewhere it leaves the group unrun and runs alone in a transaction of its own, waiting
for the lock as before (``run`` returns False). Everything else a group's statements
could wait for is a row of a subscriber it holds the lock of (the dedupe marker's key
is one subscriber's event), so the deadlock detector is only the last resort: an event
that meets one (or a serialization failure) is rolled back to its savepoint and runs
alone too. Several groups run at once (``PG_GROUPS``, each on its pooled connection),
one NOTIFY per group names the rows of all its events, with the COMMIT.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from bot_platform.database import Database, as_unavailable
from bot_platform.direct import Direct, direct
from bot_platform.outbox import notify_statement

log = logging.getLogger(__name__)

MAX_GROUP = 64  # events in one transaction at most (delivery waits for the connection)
MAX_RUNS = 4  # an event runs again at most this often when its group's transaction is lost
SAVEPOINT = "botp_event"
CLOSE_WAIT = 5.0  # seconds a closing platform waits for a group in progress
PG_GROUPS = 4  # PostgreSQL: groups in progress at once (each on a pooled connection)
# PostgreSQL errors after which an event runs alone instead of raising: a deadlock the
# server broke, a serialization failure, a lock not available.
CONTENDED = frozenset({"40P01", "40001", "55P03"})

# A body runs one event's turn in the group's transaction; it returns the outbox rows it
# queued (the group's NOTIFY names them).
Body = Callable[[AsyncSession, Direct], Awaitable[Sequence[int]]]


@functools.cache
def _raw_sqlite() -> bool:
    from bot_platform.sqlite_driver import onehop_dbapi

    return onehop_dbapi() is not None


def groups_events(db: Database) -> bool:
    """Whether ``db`` groups events: SQLite with aiosqlite's thread at hand (``Direct``),
    or PostgreSQL."""
    return (db.is_sqlite and _raw_sqlite()) or db.dialect == "postgresql"


class LostTransaction(Exception):
    """The group's transaction was rolled back as a whole after this event's turn."""


def _undo(connection: Any, name: str) -> bool:
    """On the sqlite3 connection (``Direct.call``): back to the event's savepoint, if the
    transaction is still there (False: SQLite or SQLAlchemy rolled all of it back)."""
    if not connection.in_transaction:
        return False
    connection.execute(f"ROLLBACK TO {name}")
    connection.execute(f"RELEASE {name}")
    return True


def _contended(error: BaseException) -> bool:
    """A PostgreSQL error that says the event met another transaction, not that it is bad."""
    return getattr(getattr(error, "orig", None), "pgcode", None) in CONTENDED


# How an event's turn ended: its changes stay; rolled back to its savepoint (or never
# started); the transaction is gone; not run (its subscriber was busy elsewhere).
KEPT, UNDONE, LOST, PASSED = "kept", "undone", "lost", "passed"


class _Seat:
    """One event's place in a group: its turn (the session), how the turn ended, the
    rows it queued and the commit."""

    __slots__ = ("committed", "done", "rows", "turn", "wake")

    def __init__(self, loop: asyncio.AbstractEventLoop, wake: bool) -> None:
        self.turn: asyncio.Future[AsyncSession] = loop.create_future()
        self.done: asyncio.Future[str] = loop.create_future()
        self.committed: asyncio.Future[None] = loop.create_future()
        self.wake = wake
        self.rows: Sequence[int] = ()


class EventGroups:
    """Runs events' turns one after the other in shared transactions (see the module)."""

    def __init__(self, db: Database, on_commit: Callable[[], None],
                 limit: int = MAX_GROUP, groups: int = PG_GROUPS) -> None:
        self.db = db
        self.on_commit = on_commit
        self.limit = limit
        self.postgres = db.dialect == "postgresql"
        self.at_once = groups if self.postgres else 1  # one writer on SQLite anyway
        self._waiting: deque[_Seat] = deque()
        self._leaders: set[asyncio.Task[None]] = set()
        self._free = 0  # leaders about to take the next event (not in a turn or a commit)
        self.groups = 0  # transactions committed (tests and benchmarks read it)
        self.passed = 0  # events that ran alone, their subscriber busy elsewhere

    async def close(self) -> None:
        """Let groups in progress commit before the database closes (shutting down)."""
        if self._leaders:
            await asyncio.wait(self._leaders, timeout=CLOSE_WAIT)

    async def run(self, body: Body, wake: bool = True, lock: int | None = None) -> bool:
        """Run ``body`` in a group's transaction; returns once that committed. ``body``
        may run more than once (its group lost), each time from scratch; ``wake``: the
        worker is woken after the commit. ``lock`` (PostgreSQL): the subscriber's
        advisory lock key. False: not run in a group (its subscriber is busy in
        another transaction): the caller runs it alone, waiting for the lock."""
        for attempt in range(MAX_RUNS):
            try:
                return await self._run_once(body, wake, lock)
            except LostTransaction:
                if attempt == MAX_RUNS - 1:
                    raise
                log.info("group transaction lost under another event; running again")
        raise AssertionError("unreachable")

    async def _run_once(self, body: Body, wake: bool, lock: int | None) -> bool:
        seat = _Seat(asyncio.get_running_loop(), wake)
        self._waiting.append(seat)
        # A leader that just ended may still be in the set (its done callback has not
        # run yet): only running ones count.
        self._leaders.difference_update([t for t in self._leaders if t.done()])
        if not self._free and len(self._leaders) < self.at_once:
            # Another group only when every leader is busy (a turn, a commit). A context of
            # its own: it serves many events, and its log lines must not carry the
            # first one's subscriber (bot_platform.logs).
            self._free += 1
            leader = asyncio.create_task(self._lead(), context=contextvars.Context())
            self._leaders.add(leader)
        ended = LOST  # cancelled mid-turn: what ran of it is unknown
        try:
            try:
                session = await seat.turn
            except BaseException:
                ended = UNDONE  # nothing of it ran
                seat.turn.cancel()  # not served yet: the leader skips it
                raise
            # Now, with the previous event's RELEASE, and outside the try below: rolling
            # back to a savepoint that is not yet this event's would undo its neighbour
            # (a failure here loses the group instead: its events run again).
            try:
                connection = await direct(session)
                joined = await self._savepoint(connection, lock)
            except Exception as error:
                converted = as_unavailable(error)  # the database is away: a 503
                if converted is error:
                    raise
                raise converted from error
            if not joined:
                connection.later(f"RELEASE {SAVEPOINT}")
                ended = PASSED
                self.passed += 1
                return False
            try:
                seat.rows = await body(session, connection)
                if session.new or session.dirty or session.deleted:
                    await session.flush()  # its errors are this event's
                await connection.flush()
            except Exception as error:
                ended = UNDONE if await self._undo(session, connection) else LOST
                if ended == UNDONE and _contended(error):
                    log.info("an event met another transaction's locks; running it alone")
                    self.passed += 1
                    return False
                converted = as_unavailable(error)
                if converted is error:
                    raise
                raise converted from error
            connection.later(f"RELEASE {SAVEPOINT}")  # with the next event's SAVEPOINT
            session.expunge_all()  # the next event reads nothing this one left behind
            ended = KEPT
        finally:
            if not seat.done.done():
                seat.done.set_result(ended)
        await asyncio.shield(seat.committed)
        return True

    async def _savepoint(self, connection: Direct, lock: int | None) -> bool:
        """The event's SAVEPOINT, after the previous event's RELEASE, in one trip; on
        PostgreSQL with its subscriber's advisory lock, if nobody else holds it (False:
        somebody does, and nothing was taken)."""
        if not self.postgres:
            connection.later(f"SAVEPOINT {SAVEPOINT}")
            await connection.flush()
            return True
        take = "" if lock is None else f" WHERE pg_try_advisory_xact_lock({int(lock)})"
        return await connection.simple(f"SAVEPOINT {SAVEPOINT}; SELECT 1{take}") == "SELECT 1"

    async def _undo(self, session: AsyncSession, connection: Direct) -> bool:
        """Roll the event back to its savepoint; False when the whole transaction went."""
        connection.pending.clear()
        session.expunge_all()
        transaction = session.sync_session.get_transaction()
        if transaction is None or not transaction.is_active:
            return False
        try:
            if not self.postgres:
                return bool(await connection.call(_undo, SAVEPOINT))
            adapter = connection.adapter
            if adapter is None or adapter._transaction is None or (
                    adapter._connection.is_closed()):
                return False  # the connection went, and the transaction with it
            await connection.simple(f"ROLLBACK TO SAVEPOINT {SAVEPOINT}; "
                                    f"RELEASE SAVEPOINT {SAVEPOINT}")
            return True
        except Exception:
            log.exception("rolling an event back to its savepoint failed")
            return False

    async def _lead(self) -> None:
        """Open a transaction, give waiting events their turns, commit; again while
        events wait."""
        try:
            await self._groups()
        finally:
            self._free -= 1

    async def _groups(self) -> None:
        while self._waiting:
            await asyncio.sleep(0)  # events ready in this same moment join the group
            if not self._waiting:
                break
            kept: list[_Seat] = []
            failure: BaseException | None = None
            served = 0
            try:
                # Urgent: on SQLite the connection comes to it before a broadcast's
                # waiting claims and writes (``ConnectionGate``).
                async with self.db.session(urgent=True) as session:
                    while self._waiting and served < self.limit:
                        seat = self._waiting.popleft()
                        if seat.turn.done():  # its caller gave up before its turn
                            continue
                        seat.turn.set_result(session)
                        served += 1
                        self._free -= 1
                        try:
                            ended = await seat.done
                        finally:
                            self._free += 1
                        if ended == LOST:
                            raise LostTransaction()
                        if ended == KEPT:
                            kept.append(seat)
                        if not self._waiting:
                            await asyncio.sleep(0)
                    if served:
                        self._free -= 1
                        try:
                            await self._commit(session, kept)
                        finally:
                            self._free += 1
            except BaseException as error:
                failure = error
                if not served:  # the session did not open: the waiting events fail too
                    while self._waiting:
                        seat = self._waiting.popleft()
                        if not seat.turn.done():
                            seat.turn.set_exception(error)
            for seat in kept:
                if failure is None:
                    seat.committed.set_result(None)
                else:
                    seat.committed.set_exception(
                        LostTransaction() if isinstance(failure, LostTransaction) else failure)
            if failure is None:
                self.groups += 1
                if any(seat.wake for seat in kept):
                    self.on_commit()
            elif not isinstance(failure, Exception):
                raise failure

    async def _commit(self, session: AsyncSession, kept: list[_Seat]) -> None:
        """The last RELEASE; on PostgreSQL the NOTIFY for the rows the group queued
        and the COMMIT in the same trip (else the session commits)."""
        connection = await direct(session)
        if not self.postgres:
            await connection.flush()
            return
        rows = [row for seat in kept if seat.wake for row in seat.rows]
        notify = notify_statement(rows) if rows else ""
        if not await connection.commit_with(notify) and notify:
            await connection.simple(notify)

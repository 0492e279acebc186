"""Group commit of inbound events: turns that arrive together share one transaction.

Why: on SQLite (one writer, one pooled connection) every event paid for a session, a
connection checkout, ``BEGIN IMMEDIATE`` and ``COMMIT`` of its own, and queued behind
the delivery worker's transactions for the one connection each time. Events that are
ready together now take turns inside one transaction, each in a SAVEPOINT of its own:

- a bad event is rolled back to its savepoint and raises as before (its webhook is
  answered with an error and the messenger sends it again); its neighbours commit;
- a caller returns only once the shared transaction committed: an answered webhook is
  still a durable one. The caller holds its subscriber's in-process lock until then
  (``Engine.step_transaction``), so a subscriber's next event never joins a group before
  the previous one committed: order and dedupe are what they were;
- when the transaction itself is lost under an event (an ORM flush error or SQLite
  rolled the whole of it back), the events that had finished in it run again in the
  next group; the bad one raises.

An event's RELEASE goes to SQLite with the next event's SAVEPOINT, before that event
runs anything (statements in the loop's thread: ``Direct``). Only SQLite (with
``Direct``'s raw connection) groups events; PostgreSQL keeps a transaction per event: its
pool runs them side by side, and advisory locks taken as events join could deadlock with
another process's group.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from bot_platform.database import Database, as_unavailable
from bot_platform.direct import Direct, direct

log = logging.getLogger(__name__)

MAX_GROUP = 64  # events in one transaction at most (delivery waits for the connection)
MAX_RUNS = 4  # an event runs again at most this often when its group's transaction is lost
SAVEPOINT = "botp_event"
CLOSE_WAIT = 5.0  # seconds a closing platform waits for a group in progress


@functools.cache
def _raw_sqlite() -> bool:
    from bot_platform.sqlite_driver import onehop_dbapi

    return onehop_dbapi() is not None


def groups_events(db: Database) -> bool:
    """Whether ``db`` groups events: SQLite, with aiosqlite's thread at hand (``Direct``)."""
    return db.is_sqlite and _raw_sqlite()


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


KEPT, UNDONE, LOST = "kept", "undone", "lost"  # how an event's turn ended


class _Seat:
    """One event's place in a group: its turn (the session), how the turn ended (``KEPT``:
    its changes stay; ``UNDONE``: rolled back to its savepoint, or never started;
    ``LOST``: the transaction is gone) and the commit."""

    __slots__ = ("committed", "done", "turn", "wake")

    def __init__(self, loop: asyncio.AbstractEventLoop, wake: bool) -> None:
        self.turn: asyncio.Future[AsyncSession] = loop.create_future()
        self.done: asyncio.Future[str] = loop.create_future()
        self.committed: asyncio.Future[None] = loop.create_future()
        self.wake = wake


class EventGroups:
    """Runs events' turns one after the other in shared transactions (see the module)."""

    def __init__(self, db: Database, on_commit: Callable[[], None],
                 limit: int = MAX_GROUP) -> None:
        self.db = db
        self.on_commit = on_commit
        self.limit = limit
        self._waiting: deque[_Seat] = deque()
        self._leader: asyncio.Task[None] | None = None
        self.groups = 0  # transactions committed (tests and benchmarks read it)

    async def close(self) -> None:
        """Let a group in progress commit before the database closes (shutting down)."""
        if self._leader is not None and not self._leader.done():
            await asyncio.wait([self._leader], timeout=CLOSE_WAIT)

    async def run(self, body: Callable[[AsyncSession, Direct], Awaitable[None]],
                  wake: bool = True) -> None:
        """Run ``body`` in a group's transaction; returns once that committed. ``body``
        may run more than once (its group lost), each time from scratch; ``wake``: the
        worker is woken after the commit."""
        for attempt in range(MAX_RUNS):
            try:
                await self._run_once(body, wake)
                return
            except LostTransaction:
                if attempt == MAX_RUNS - 1:
                    raise
                log.info("group transaction lost under another event; running again")

    async def _run_once(self, body: Callable[[AsyncSession, Direct], Awaitable[None]],
                        wake: bool) -> None:
        seat = _Seat(asyncio.get_running_loop(), wake)
        self._waiting.append(seat)
        if self._leader is None or self._leader.done():
            # A context of its own: it serves many events, and its log lines must not
            # carry the first one's subscriber (bot_platform.logs).
            self._leader = asyncio.create_task(self._lead(), context=contextvars.Context())
        ended = LOST  # cancelled mid-turn: what ran of it is unknown
        try:
            try:
                session = await seat.turn
            except BaseException:
                ended = UNDONE  # nothing of it ran
                seat.turn.cancel()  # not served yet: the leader skips it
                raise
            connection = await direct(session)
            connection.later(f"SAVEPOINT {SAVEPOINT}")
            # Now, with the previous event's RELEASE, and outside the try below: rolling
            # back to a savepoint that is not yet this event's would undo its neighbour
            # (a failure here loses the group instead: its events run again).
            await connection.flush()
            try:
                await body(session, connection)
                if session.new or session.dirty or session.deleted:
                    await session.flush()  # its errors are this event's
                await connection.flush()
            except Exception as error:
                ended = UNDONE if await self._undo(session, connection) else LOST
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

    async def _undo(self, session: AsyncSession, connection: Direct) -> bool:
        """Roll the event back to its savepoint; False when the whole transaction went."""
        connection.pending.clear()
        session.expunge_all()
        transaction = session.sync_session.get_transaction()
        if transaction is None or not transaction.is_active:
            return False
        try:
            return bool(await connection.call(_undo, SAVEPOINT))
        except Exception:
            log.exception("rolling an event back to its savepoint failed")
            return False

    async def _lead(self) -> None:
        """Open a transaction, give waiting events their turns, commit; again while
        events wait."""
        while self._waiting:
            await asyncio.sleep(0)  # events ready in this same moment join the group
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
                        ended = await seat.done
                        if ended == LOST:
                            raise LostTransaction()
                        if ended == KEPT:
                            kept.append(seat)
                        if not self._waiting:
                            await asyncio.sleep(0)
                    await (await direct(session)).flush()  # the last RELEASE
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

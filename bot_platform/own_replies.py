"""A web process's own replies: on PostgreSQL, ``botp web`` sends the rows its own turns
queue, as ``botp run`` does in one process, instead of handing each turn to a worker.

Why: the hand-over (a NOTIFY, every worker's LISTEN, a worker's claim by id, the send,
its result) cost more CPU than the send itself: on the project's 2-core machine one
``botp run`` process on PostgreSQL answered more updates/s than ``botp web`` + 2 workers
(``bench/README.md``).

How: a turn's rows that are their subscriber's oldest unsent rows are claimed by the
turn's own transaction, its last statement before the commit (``OutboxClaims.
claim_queued``, under the subscriber's advisory lock): no NOTIFY, no claim of their own.
Once committed they are sent in order (``Delivery.deliver``); a row that does not go out
(a retry, a put-back) gives the turn's later rows back to the workers. When an earlier
row of the subscriber is still being sent by this process, the turn's rows wait for it
and are then claimed by id (``OutboxClaims.claim_rows``). Otherwise (an earlier row is a
worker's: a timer's message, a broadcast's) the turn wakes the workers as before.
Timers, broadcasts, retries stay with the workers.

Leases as everywhere: a row is sent only while its lease is surely still this
process's (``Delivery``), renewed while in hand. A web frozen past its lease sends
nothing a worker has taken over; a web that dies after the commit leaves rows a worker
sends once their lease expires; no transaction is open across a messenger call.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from bot_platform.database import Database
from bot_platform.delivery import Delivery
from bot_platform.outbox import INTERACTIVE, notify_workers
from bot_platform.outbox_results import ClaimedRow
from bot_platform.pipeline import wait_any
from bot_platform.turns import Identity, Turns
from bot_platform.types import SendStatus

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Held:
    """A turn's rows its transaction claimed (``rows``), or parked ids (``ids``)."""

    rows: list[ClaimedRow]
    started: float = 0.0
    until: datetime | None = None
    ids: tuple[int, ...] = ()


class OwnReplies:
    """Sends the rows this process's turns queue (``Turns.sender``) while ``run`` runs."""

    def __init__(self, turns: Turns, delivery: Delivery, db: Database) -> None:
        self.turns = turns
        self.delivery = delivery
        self.db = db
        # Subscribers with rows being sent here, how many runs; and their turns' rows
        # parked until those are done (the rows before theirs are still unsent until
        # the results commit), then claimed by id.
        self._sending: dict[Identity, int] = {}
        self._parked: dict[Identity, list[tuple[int, ...]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._semaphore = asyncio.Semaphore(delivery.settings.concurrency)
        self._running = False

    # ---- in the turn (``Turns.open``) ---------------------------------------------------

    async def take(self, session: AsyncSession, identity: Identity | None,
                   ids: list[int]) -> _Held | None:
        """Claim the turn's rows in its transaction if nothing of the subscriber is still
        unsent before them; else park them if this process is sending that subscriber's
        earlier rows; else None (the workers are woken)."""
        if not self._running:
            return None
        rows, started, until = await self.delivery.outbox.claim_queued(session, ids)
        if rows:
            if len(rows) < len(ids):  # behind a row queued meanwhile: a worker's
                claimed = {row.id for row in rows}
                await notify_workers(session, INTERACTIVE,
                                     rows=[i for i in ids if i not in claimed])
            return _Held(rows, started, until)
        if identity is not None and identity in self._sending:
            return _Held([], ids=tuple(ids))
        return None

    def taken(self, identity: Identity | None, taken: _Held) -> None:
        """The turn committed: send its rows (or park them behind this process's)."""
        if taken.ids:
            if identity is not None and identity in self._sending:
                self._parked.setdefault(identity, []).append(taken.ids)
            else:  # finished meanwhile
                self._start(identity, self._claim_and_send(taken.ids))
            return
        assert taken.until is not None
        self.delivery.outbox.leases.taken((row.id for row in taken.rows), taken.started,
                                          taken.until)
        self._start(identity, self._send(taken.rows))

    # ---- sending ------------------------------------------------------------------------

    def _start(self, identity: Identity | None, work: Coroutine[Any, Any, None]) -> None:
        if identity is not None:
            self._sending[identity] = self._sending.get(identity, 0) + 1
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(lambda done: self._done(identity, done))

    def _done(self, identity: Identity | None, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("sending a turn's rows failed", exc_info=task.exception())
        if identity is None:
            return
        left = self._sending.get(identity, 0) - 1
        if left > 0:
            self._sending[identity] = left
            return
        self._sending.pop(identity, None)
        parked = self._parked.pop(identity, None)
        if parked:
            ids = tuple(i for turn in parked for i in turn)
            self._start(identity, self._claim_and_send(ids))

    async def _send(self, rows: list[ClaimedRow]) -> None:
        """A turn's rows, in order; after one that did not go out, the rest go back to
        the workers (they follow it once it is sent)."""
        for index, row in enumerate(rows):
            if await self.delivery.deliver(row, self._semaphore) == SendStatus.SENT:
                continue
            for later in rows[index + 1:]:
                try:
                    if self.delivery.owns(later):
                        await self.delivery.release(later, 0.0)
                finally:
                    self.delivery.outbox.leases.let_go(later.id)
                    self.delivery.pressure.sent(later.id)
            return

    async def _claim_and_send(self, ids: tuple[int, ...]) -> None:
        """Parked rows, once this process's earlier rows of their subscriber are done:
        claimed by id; what cannot be claimed goes to the workers."""
        claimed, more = await self.delivery.outbox.claim_rows([ids[0]])
        if not claimed:
            await self._hand_over(list(ids))
            return
        row, has_more = claimed[0], claimed[0].subscriber_id in more
        while row is not None:
            status = await self.delivery.deliver(row, self._semaphore)
            if status != SendStatus.SENT or not has_more:
                return
            row, has_more = await self.delivery.outbox.claim_next_of(row.subscriber_id, True)

    async def _hand_over(self, ids: list[int]) -> None:
        """Wake the workers for rows this process does not send (named, as a turn's
        commit names them; without a NOTIFY their polls find them within a poll)."""
        for row_id in ids:
            self.delivery.pressure.sent(row_id)
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
            left = [i for turns in self._parked.values() for ids in turns for i in ids]
            self._parked.clear()
            if left:
                await self._hand_over(left)

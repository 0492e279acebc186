"""A claim-and-handle loop that never waits for its slowest item.

The worker's two halves (the scheduler's jobs, the delivery's outbox rows) both claim work
in batches. Waiting for a whole batch before claiming the next lets one slow item (a long
job, a row waiting for its rate-limit slot) hold up everything behind it and leaves the
messenger idle between batches; a ``Pipeline`` claims more whenever half of what it holds
is done.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)

Finished = Callable[[int], None]


async def wait_any(seconds: float, *events: asyncio.Event) -> None:
    """Until one of the events is set or ``seconds`` pass."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


class Pipeline:
    """Holds up to ``capacity`` claimed items, claiming more when half are done.

    ``claim(limit)`` returns how many items it claimed and what ``handle`` needs;
    ``handle(claimed, finished)`` processes them, calling ``finished(n)`` as items end."""

    def __init__(self, name: str, capacity: int,
                 claim: Callable[[int], Awaitable[tuple[int, Any]]],
                 handle: Callable[[Any, Finished], Awaitable[Any]]) -> None:
        self.name = name
        self.capacity = capacity
        self.claim = claim
        self.handle = handle
        self.holding = 0
        self._room = asyncio.Event()
        # A claim may have missed work that waits behind items in hand (a subscriber's
        # next message behind the one being sent), or none was made for lack of room:
        # claim again when items finish. Otherwise a finished item is no reason to claim
        # (that claim found nothing, again and again: a trip per message for each loop).
        self._recheck = False

    def _finished(self, count: int) -> None:
        self.holding -= count
        if self.holding <= self.capacity // 2 and self._recheck:
            self._room.set()

    async def run(self, stop: asyncio.Event, wake: asyncio.Event, poll_interval: float,
                  grace: float) -> None:
        """Until ``stop``; then lets what it holds finish for up to ``grace`` seconds."""
        batches: set[asyncio.Task[Any]] = set()
        while not stop.is_set():
            wake.clear()
            self._room.clear()
            claimed = asked = 0
            # Items in hand that finish while we claim (or wait for room) may free work
            # the claim does not see: their ``_finished`` then sets ``_room``.
            self._recheck = self.holding > 0
            if self.holding <= self.capacity // 2:
                held, asked = self.holding, self.capacity - self.holding
                try:
                    claimed, work = await self.claim(asked)
                except Exception:  # the database may be restarting: back off and carry on
                    log.exception("%s: claiming failed; retrying", self.name)
                    await wait_any(poll_interval * 4, stop)
                    continue
                self._recheck = held > 0 and claimed < asked
            if claimed:
                self.holding += claimed
                task = asyncio.create_task(self.handle(work, self._finished))
                batches.add(task)
                task.add_done_callback(self._forget(batches))
                if claimed >= asked:
                    continue  # a full claim: more may be ready now
            # Less than asked: nothing more is ready now. Work queued meanwhile (during
            # the claim too) has set ``wake``; rows that come due are found by the poll.
            await wait_any(poll_interval, stop, wake, self._room)
        if batches:
            await asyncio.wait(batches, timeout=grace)

    def _forget(self, batches: set[asyncio.Task[Any]]) -> Callable[[asyncio.Task[Any]], None]:
        def done(task: asyncio.Task[Any]) -> None:
            batches.discard(task)
            if not task.cancelled() and task.exception() is not None:
                log.error("%s: a batch failed", self.name, exc_info=task.exception())
        return done

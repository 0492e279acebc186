"""Group commit of send results: every sender waits until its own row's result is
committed, but results that come in together share one transaction.

Why apart from delivery: a subscriber's next row waits for the result of the one
before (rows go out in order), so an interactive row's result is written apart and
urgently, never behind a broadcast's 500 results nor their place in the queue for
SQLite's one connection (issue 15); and a write waits out a database that went away.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable

from bot_platform.config import WorkerSettings
from bot_platform.database import is_transient_db_error
from bot_platform.outbox_claims import OutboxClaims
from bot_platform.outbox_results import Outcome

log = logging.getLogger(__name__)

MAX_GROUP_COMMIT = 500  # results written in one transaction at most
# Seconds a group of broadcast rows' results waits for more to join it before its write,
# when results come in faster than one at a time (PostgreSQL). Each write is a
# transaction with a WAL flush: with three workers at 1,000 sends/s a group was 3-4
# rows, and the commits cost the database more than all the claims. Nobody waits for a
# broadcast row's result; an interactive row's result ends the wait at once. (A crash
# in that time loses those results, as it would during their write: the rows are sent
# again.)
LINGER = 0.02


class GroupCommit:
    """Results written by group commit: every sender waits until its own row is
    committed, but rows that finish together share one transaction."""

    def __init__(self, write: Callable[[list[Outcome]], Awaitable[None]],
                 linger: float = LINGER) -> None:
        self.write = write
        self.linger = linger
        self._commits: list[tuple[Outcome, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._urgent = asyncio.Event()  # set when an interactive row's result comes

    async def __call__(self, outcome: Outcome) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._commits.append((outcome, future))
        if outcome.row.urgent:
            self._urgent.set()
        if self._flusher is None or self._flusher.done():
            # In a context of its own: it writes many senders' rows, and its log lines
            # must not carry the first sender's subscriber (bot_platform.logs).
            self._flusher = asyncio.create_task(self._flush(), context=contextvars.Context())
        await asyncio.shield(future)  # a cancelled sender must not lose its row's result

    async def _flush(self) -> None:
        while self._commits:
            await asyncio.sleep(0)  # senders answered in this same moment join the batch
            await self._linger()
            batch = self._commits[:MAX_GROUP_COMMIT]
            del self._commits[:MAX_GROUP_COMMIT]
            try:
                await self.write([outcome for outcome, _ in batch])
            except BaseException as error:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                if not isinstance(error, Exception):
                    raise
            else:
                for _, future in batch:
                    if not future.done():
                        future.set_result(None)


    async def _linger(self) -> None:
        """While only broadcast rows' results wait, more than one (a busy broadcast) and
        fewer than a full group, wait up to ``linger`` for more, or for an interactive
        row's result."""
        if not self.linger or not 1 < len(self._commits) < MAX_GROUP_COMMIT:
            return
        if any(outcome.row.urgent for outcome, _ in self._commits):
            return
        self._urgent.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._urgent.wait(), self.linger)


class ResultWriter:
    """The results of one worker's sends, written by two group commits: interactive
    rows' (urgent) and broadcasts' (lingering on PostgreSQL)."""

    def __init__(self, outbox: OutboxClaims, settings: WorkerSettings,
                 linger: float = LINGER) -> None:
        self.outbox = outbox
        self.settings = settings
        # Looked up at each write, so a test may replace ``_write_until_stored``.
        self._commit = GroupCommit(lambda outcomes: self._write_until_stored(outcomes),
                                   linger=linger)
        self._commit_urgent = GroupCommit(
            lambda outcomes: self._write_until_stored(outcomes), linger=0.0)

    async def store(self, outcome: Outcome) -> None:
        """Written by the urgent rows' group commit or the others'."""
        await (self._commit_urgent if outcome.row.urgent else self._commit)(outcome)

    async def _write_until_stored(self, outcomes: list[Outcome]) -> None:
        """Write, waiting out a database that went away (for up to a lease: after that
        the rows are other workers' again, and a late write would be refused anyway)."""
        deadline = time.monotonic() + self.settings.lease_seconds
        attempt = 0
        while True:
            try:
                await self.outbox.write(outcomes, urgent=all(o.row.urgent for o in outcomes))
                return
            except Exception as error:
                attempt += 1
                if not is_transient_db_error(error) or time.monotonic() > deadline:
                    raise
                log.warning("recording %d send results failed (%s); retrying",
                            len(outcomes), type(error).__name__)
                await asyncio.sleep(min(5.0, 0.1 * 2 ** attempt))

"""The worker loop: due timers and queued messages, woken early when the engine commits
new work in this process and polling otherwise (other processes' work)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from bot_platform.delivery import Delivery
from bot_platform.jobs import Scheduler
from bot_platform.outbox import INTERACTIVE, named_rows
from bot_platform.pipeline import wait_any

log = logging.getLogger(__name__)


def new_worker_id() -> str:
    return f"{socket.gethostname()[:24]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Worker:
    """Runs the scheduler and the delivery side by side until stopped."""

    def __init__(self, scheduler: Scheduler, delivery: Delivery, poll_interval: float,
                 on_idle: Callable[[], Awaitable[Any]] | None = None,
                 idle_every: float = 30.0,
                 wakeups: Callable[[asyncio.Event], Awaitable[None]] | None = None) -> None:
        self.scheduler = scheduler
        self.delivery = delivery
        self.poll_interval = poll_interval
        self.wake = asyncio.Event()  # the scheduler's
        self.delivery_wakes = (asyncio.Event(), asyncio.Event())  # interactive, bulk
        self.on_idle = on_idle  # housekeeping every idle_every s (new bots from the API)
        self.idle_every = idle_every
        # Runs beside the loops and calls ``notify`` when another process queued work
        # (PostgreSQL LISTEN); polling every ``poll_interval`` covers the rest.
        self.wakeups = wakeups

    def notify(self, what: str = "") -> None:
        """New work was committed (in this process, or another one's ``NOTIFY``): do not
        wait for the next poll. ``what`` is ``INTERACTIVE`` when only interactive outbox
        rows were queued: only that pipeline claims, not all three (a claim that finds
        nothing is still a transaction, in every worker process, for every event), and
        it claims the rows the payload names by id, if it names them."""
        named = named_rows(what)
        if named is not None or what == INTERACTIVE:
            # False: another worker's turn, its claim takes the rows.
            if self.delivery.outbox.named(named):
                self.delivery_wakes[0].set()
            return
        self.wake.set()
        for wake in self.delivery_wakes:
            wake.set()

    async def tick(self) -> int:
        """One round of timers and deliveries; returns how much work was done."""
        return await self.scheduler.run_once() + await self.delivery.run_once()

    async def drain(self, max_rounds: int = 10_000) -> int:
        """Run rounds until nothing is due now (tests, the console, ``/wait``)."""
        total = 0
        for _ in range(max_rounds):
            done = await self.tick()
            total += done
            if done == 0:
                return total
        raise RuntimeError(f"worker still busy after {max_rounds} rounds")

    async def run(self, stop: asyncio.Event, grace: float = 15.0) -> None:
        """Timers and deliveries side by side until ``stop`` is set, each a pipeline, so a
        burst of timers never pauses a broadcast (nor the reverse), and replies have a
        delivery pipeline of their own beside the broadcasts'; then what is in hand may
        finish for ``grace`` seconds."""
        log.info("worker %s started", self.delivery.worker_id)
        helpers = [asyncio.create_task(self._renew_leases(stop)),
                   asyncio.create_task(self._housekeeping(stop))]
        if self.wakeups is not None:
            helpers.append(asyncio.create_task(self.wakeups(stop)))
        try:
            await asyncio.gather(
                self.scheduler.pipeline().run(stop, self.wake, self.poll_interval, grace),
                *(pipeline.run(stop, wake, self.poll_interval, grace) for pipeline, wake
                  in zip(self.delivery.pipelines(), self.delivery_wakes, strict=True)))
        finally:
            for helper in helpers:
                helper.cancel()
            # Awaited: a helper cut off mid-query must be done before the platform closes
            # the database, or it waits forever on a connection that is gone.
            await asyncio.gather(*helpers, return_exceptions=True)
        log.info("worker %s stopped", self.delivery.worker_id)

    async def _housekeeping(self, stop: asyncio.Event) -> None:
        """Every ``idle_every`` seconds: bots and flows changed by other processes."""
        while self.on_idle is not None and not stop.is_set():
            await wait_any(self.idle_every, stop)
            try:
                await self.on_idle()
            except Exception:
                log.exception("worker housekeeping failed")

    async def _renew_leases(self, stop: asyncio.Event) -> None:
        """The heartbeat: while this worker lives, what it holds stays its own."""
        every = self.scheduler.settings.lease_seconds / 4
        while not stop.is_set():
            await wait_any(every, stop)
            try:
                await self.delivery.renew_leases()
                await self.scheduler.renew_leases()
            except Exception as error:  # the database may be away: the next beat retries
                log.warning("renewing leases failed: %s: %s", type(error).__name__, error)

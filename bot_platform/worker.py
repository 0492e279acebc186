"""The worker loop: due timers and queued messages, woken early when the engine commits
new work in this process and polling otherwise (other processes' work)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from bot_platform.delivery import Delivery, wait_any
from bot_platform.jobs import Scheduler

log = logging.getLogger(__name__)


def new_worker_id() -> str:
    return f"{socket.gethostname()[:24]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Worker:
    """Runs the scheduler and the delivery side by side until stopped."""

    def __init__(self, scheduler: Scheduler, delivery: Delivery, poll_interval: float,
                 on_idle: Callable[[], Awaitable[Any]] | None = None,
                 idle_every: float = 30.0) -> None:
        self.scheduler = scheduler
        self.delivery = delivery
        self.poll_interval = poll_interval
        self.wake = asyncio.Event()  # the scheduler's
        self.delivery_wake = asyncio.Event()
        self.on_idle = on_idle  # housekeeping between rounds (new bots from the API)
        self.idle_every = idle_every
        self._last_idle = 0.0

    def notify(self) -> None:
        """New work was committed in this process: do not wait for the next poll."""
        self.wake.set()
        self.delivery_wake.set()

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

    async def run(self, stop: asyncio.Event) -> None:
        """Timers and deliveries side by side until ``stop`` is set: the delivery keeps its
        own pipeline full, so a burst of timers never pauses a broadcast (nor the reverse)."""
        log.info("worker %s started", self.delivery.worker_id)
        heartbeat = asyncio.create_task(self._renew_leases(stop))
        try:
            await asyncio.gather(
                self._run_scheduler(stop),
                self.delivery.run(stop, self.delivery_wake, self.poll_interval))
        finally:
            heartbeat.cancel()
        log.info("worker %s stopped", self.delivery.worker_id)

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

    async def _run_scheduler(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.wake.clear()  # before the round: a commit during it wakes the next one
            try:
                done = await self.scheduler.run_once()
            except Exception:  # the database may be restarting: back off and carry on
                log.exception("scheduler round failed; retrying")
                done = 0
                await wait_any(self.poll_interval * 4, stop)
            if done:
                continue
            if self.on_idle is not None and time.monotonic() - self._last_idle > self.idle_every:
                self._last_idle = time.monotonic()
                try:
                    await self.on_idle()
                except Exception:
                    log.exception("worker housekeeping failed")
            await wait_any(self.poll_interval, stop, self.wake)


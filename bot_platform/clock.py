"""Time as a seam: the engine, scheduler and delivery read time only through a ``Clock``.

Tests move a ``ManualClock`` forward instead of sleeping. A running process always uses
the real time: the console's ``/wait 1d`` does not move any clock (a moved clock would
date rows other processes read in the future); it makes one user's own timers due earlier
(``bots.console.fast_forward``).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    """Tells the current time (timezone-aware UTC)."""

    def now(self) -> datetime: ...


class SystemClock:
    """The real time."""

    def now(self) -> datetime:
        return datetime.now(UTC)


class ManualClock:
    """A clock that stands still until told to move (tests)."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2026, 1, 1, 9, 0, tzinfo=UTC)

    def now(self) -> datetime:
        return self._now

    def advance(self, delta: timedelta) -> None:
        self._now += delta

    async def sleep(self, seconds: float) -> None:  # pragma: no cover - convenience
        self.advance(timedelta(seconds=seconds))
        await asyncio.sleep(0)

"""Interactive pressure: how many inbound turns are in flight in this process.

Why: in one ``botp run`` (SQLite) process a broadcast's sends share the event loop and
the single database connection with the webhooks' turns, and live replies got 5-15x
slower while a broadcast was sending (issue 15, ``bench/replies.py``). The engine counts
its turns here; delivery makes a broadcast's row wait, briefly and at most ``max_wait``
per row (so a constant stream of webhooks cannot starve a broadcast), until no turn is
in flight. Interactive rows never wait. A ``botp worker`` has no webhooks: never busy.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

MAX_WAIT = 0.05  # seconds a bulk row yields to turns in flight, at most


class InteractivePressure:
    """A counter of turns in flight and an event set whenever it is zero."""

    def __init__(self, max_wait: float = MAX_WAIT) -> None:
        self.max_wait = max_wait
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.contextmanager
    def turn(self) -> Iterator[None]:
        """Count one interactive turn for as long as the block runs."""
        self.in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    async def yield_to_interactive(self) -> None:
        """Wait until no turn is in flight, or ``max_wait`` at most."""
        if self.in_flight == 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), self.max_wait)

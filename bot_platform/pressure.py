"""Interactive pressure: whether this process has an answer under way right now.

Why: in one ``botp run`` (SQLite) process a broadcast's sends share the event loop and
the single database connection with the webhooks' turns, and live replies got 5-15x
slower while a broadcast was sending (issue 15, ``bench/replies.py``). An answer is under
way from the moment its webhook's turn starts until the messages that turn queued have
been sent (not only until the turn commits: claiming and sending the reply took most of
its time while a broadcast ran). Meanwhile delivery holds a broadcast's rows back, and
its claims and result writes, briefly: at most ``max_wait`` per wait, so a constant
stream of webhooks slows a broadcast down but cannot starve it. A row an answer queued
stops counting once sent, or after ``hold`` seconds whatever became of it (held for a
webhook response, waiting for its chat's rate-limit slot, delivered by another process).
Interactive rows never wait. A ``botp worker`` has no webhooks: never busy.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator

MAX_WAIT = 0.05  # seconds a broadcast's step waits for answers under way, at most
HOLD = 1.0  # seconds an answer's queued row keeps the pressure on, at most


class InteractivePressure:
    """Turns in flight and the rows they queued that are not sent yet; ``_idle`` is set
    whenever there are none."""

    def __init__(self, max_wait: float = MAX_WAIT, hold: float = HOLD,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.max_wait = max_wait
        self.hold = hold
        self.monotonic = monotonic
        self.in_flight = 0
        self.last_turn = -math.inf  # when the latest turn started (``monotonic``)
        self._unsent: dict[int, float] = {}  # outbox id -> when it stops counting
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.contextmanager
    def turn(self) -> Iterator[None]:
        """Count one interactive turn for as long as the block runs."""
        self.in_flight += 1
        self.last_turn = self.monotonic()
        self._idle.clear()
        try:
            yield
        finally:
            self.in_flight -= 1
            self._settle()

    def queued(self, outbox_ids: Iterable[int]) -> None:
        """A turn's answer: its rows keep the pressure on until ``sent`` (or ``hold``)."""
        until = self.monotonic() + self.hold
        for outbox_id in outbox_ids:
            self._unsent[outbox_id] = until
            self._idle.clear()

    def sent(self, outbox_id: int) -> None:
        """One of the answer's rows is done with (sent, or given up here)."""
        if self._unsent.pop(outbox_id, None) is not None:
            self._settle()

    def talking(self, within: float) -> bool:
        """Whether a turn started in the last ``within`` seconds (people are talking to
        this process, not only now)."""
        return self.monotonic() - self.last_turn < within

    @property
    def busy(self) -> bool:
        """Whether an answer is under way in this process."""
        if self._unsent:
            self._settle()
        return not self._idle.is_set()

    def _settle(self) -> None:
        """Forget rows past their hold; set ``_idle`` when nothing is under way."""
        if self._unsent:
            now = self.monotonic()
            if min(self._unsent.values()) <= now:
                self._unsent = {i: t for i, t in self._unsent.items() if t > now}
        if self.in_flight == 0 and not self._unsent:
            self._idle.set()

    async def yield_to_interactive(self, at_most: float | None = None) -> None:
        """Wait until no answer is under way, or ``max_wait`` (``at_most``) at most."""
        if not self.busy:
            return
        deadline = self.monotonic() + (self.max_wait if at_most is None else at_most)
        while self.busy:
            now = self.monotonic()
            if now >= deadline:
                return
            # Woken by the last answer's end, or when its oldest row's hold runs out.
            wait = min([deadline, *self._unsent.values()]) - now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), max(wait, 0.001))

"""Rate limiting for sends: per bot and per chat token buckets, plus bot-wide pauses
after a messenger's ``retry_after``. The seam is ``RateLimiter``; ``MemoryRateLimiter``
serves one process, a Redis-backed one shares the budget between worker processes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Limits:
    """How fast one bot may send, overall and per chat (``math.inf`` = unlimited)."""

    per_bot: float
    per_chat: float
    chat_burst: int = 3
    bot_burst: int | None = None  # defaults to one second's worth


class RateLimiter(Protocol):
    """Decides how long a send must wait; never sleeps itself."""

    async def reserve(self, bot: str, chat: str, limits: Limits, max_wait: float) -> float:
        """Seconds to wait before sending. If that is more than ``max_wait`` nothing is
        reserved and the caller should come back later; otherwise the slot is taken."""
        ...

    async def pause(self, bot: str, seconds: float) -> None:
        """Send nothing for this bot for ``seconds`` (the messenger said retry_after)."""
        ...


class _Bucket:
    __slots__ = ("capacity", "rate", "tokens", "updated")

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate, self.capacity, self.tokens, self.updated = rate, capacity, capacity, now

    def refill(self, now: float) -> None:
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    def wait(self) -> float:
        return 0.0 if self.tokens >= 1 else (1 - self.tokens) / self.rate


class MemoryRateLimiter:
    """Token buckets in this process's memory."""

    def __init__(self, monotonic=time.monotonic) -> None:
        self.monotonic = monotonic
        self._buckets: dict[tuple[str, str], _Bucket] = {}
        self._paused_until: dict[str, float] = {}

    def _bucket(self, key: tuple[str, str], rate: float, capacity: float, now: float) -> _Bucket:
        bucket = self._buckets.get(key)
        if bucket is None or bucket.rate != rate or bucket.capacity != capacity:
            bucket = self._buckets[key] = _Bucket(rate, capacity, now)
        bucket.refill(now)
        return bucket

    async def reserve(self, bot: str, chat: str, limits: Limits, max_wait: float) -> float:
        now = self.monotonic()
        buckets = []
        if not math.isinf(limits.per_bot):
            capacity = limits.bot_burst or max(1.0, limits.per_bot)
            buckets.append(self._bucket(("bot", bot), limits.per_bot, capacity, now))
        if not math.isinf(limits.per_chat):
            buckets.append(self._bucket(("chat", f"{bot}\x1f{chat}"), limits.per_chat,
                                        float(limits.chat_burst), now))
        paused = max(0.0, self._paused_until.get(bot, 0.0) - now)
        delay = max([paused, *(b.wait() for b in buckets)])
        if delay > max_wait:
            return delay
        for bucket in buckets:
            # Take the token now, to be spent ``delay`` seconds from now.
            bucket.tokens -= 1
        if len(self._buckets) > 100_000:  # forget idle chats
            self._buckets = {k: b for k, b in self._buckets.items()
                             if b.tokens < b.capacity or k[0] == "bot"}
        return delay

    async def pause(self, bot: str, seconds: float) -> None:
        until = self.monotonic() + seconds
        self._paused_until[bot] = max(self._paused_until.get(bot, 0.0), until)

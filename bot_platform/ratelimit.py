"""Rate limiting for sends: per bot and per chat token buckets, plus bot-wide pauses
after a messenger's ``retry_after``. The seam is ``RateLimiter``; ``MemoryRateLimiter``
serves one process, a Redis-backed one shares the budget between worker processes.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from bot_platform.ratelimit_batch import RESERVE_MANY, ReserveBatcher

log = logging.getLogger(__name__)

# While the limiter cannot be asked (Redis away), each bot's sends are held and that is
# said once per bot per this many seconds, not once per send.
OUTAGE_LOG_SECONDS = 30.0
# After a send found the bot's bucket short (see ``Pacer._at_once``), the bot's sends take
# their two slots one after the other again for this long: the bot is sending at its limit.
CONTENDED_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class Limits:
    """How fast one bot may send, overall and per chat (``math.inf`` = unlimited)."""

    per_bot: float
    per_chat: float
    chat_burst: int = 3
    bot_burst: float | None = None  # defaults to 10 ms worth (at least one message)

    @property
    def bot_capacity(self) -> float:
        """A messenger counts sends in a sliding second, so a bucket holding a whole
        second's worth would let up to twice the limit through in the first second."""
        return self.bot_burst or max(1.0, self.per_bot / 100)


class RateLimiter(Protocol):
    """Decides how long a send must wait; never sleeps itself."""

    async def reserve(self, bot: str, chat: str, limits: Limits, max_wait: float) -> float:
        """Seconds to wait before sending. If that is more than ``max_wait`` nothing is
        reserved and the caller should come back later; otherwise the slot is taken."""
        ...

    async def pause(self, bot: str, seconds: float) -> None:
        """Send nothing for this bot for ``seconds`` (the messenger said retry_after)."""
        ...


@runtime_checkable
class ClosableLimiter(Protocol):
    """Optional: a limiter holding a connection (Redis) that the platform closes."""

    async def close(self) -> None: ...


_Waiter = tuple[asyncio.Future[float], Limits, float]  # slot, bot-only limits, max_wait


class Pacer:
    """Takes send slots for one process: the chat's slot first (waiting for it holds
    nobody else up), then the bot's, handed out in order by one pacing task per bot.

    The pacing task reserves each bot-wide slot at the real current time and wakes its
    sender when the slot comes. Woken late itself (a busy event loop, a GC pause), it
    finds the bucket refilled, never beyond its 10 ms capacity, and wakes the next
    senders at once: late sends cannot bunch up and overrun the messenger's window, and
    no slot is wasted. (Every sender reserving ahead and sleeping until its own slot would
    bunch them whenever the loop ran late.)

    Urgent senders (an answer to someone in a conversation) are handed the next slot
    before any bulk sender (a broadcast) still waiting: a reply waits for one slot, not
    behind every broadcast row this process holds.

    A limiter that cannot be asked (Redis away) holds the bot's sends: the wait comes
    back as more than ``max_wait``, and the outage is logged once per bot per
    ``OUTAGE_LOG_SECONDS`` (workers used to log it for every send, hundreds a second).

    While nobody waits for the bot's slots, a send asks for both slots at once: one
    call of the limiter (a Redis script) instead of two. Only when a bucket is short
    does it fall back to the chat's slot, then the bot's from the pacing task."""

    def __init__(self, limiter: RateLimiter, monotonic: Any = time.monotonic) -> None:
        self.limiter = limiter
        self.monotonic = monotonic
        self._outage_said: dict[str, float] = {}  # bot -> when its outage was last logged
        # Per bot: (urgent, bulk) senders waiting for a bot-wide slot, each in order.
        self._waiting: dict[str, tuple[deque[_Waiter], deque[_Waiter]]] = {}
        self._pacers: dict[str, asyncio.Task[None]] = {}
        self._contended: dict[str, float] = {}  # bot -> until when: no slots at once

    async def wait(self, bot: str, chat: str, limits: Limits, max_wait: float,
                   urgent: bool = False) -> float:
        """0 when it is time to send; otherwise the wait (more than ``max_wait``) for the
        next slot, and the caller should come back later."""
        try:
            delay = await self._wait(bot, chat, limits, max_wait, urgent)
        except Exception as error:
            self._outage(bot, error)
            return max_wait * 2
        if self._outage_said and self._outage_said.pop(bot, None) is not None:
            log.info("rate limiter available again; sending for %s", bot)
        return delay

    def _outage(self, bot: str, error: Exception) -> None:
        now = self.monotonic()
        said = self._outage_said.get(bot)
        if said is not None and now - said < OUTAGE_LOG_SECONDS:
            return
        self._outage_said[bot] = now
        log.warning("rate limiter unavailable (%s: %s); holding sends of %s (said once "
                    "every %.0f s while it lasts)", type(error).__name__, error, bot,
                    OUTAGE_LOG_SECONDS)

    async def _wait(self, bot: str, chat: str, limits: Limits, max_wait: float,
                    urgent: bool) -> float:
        tried = await self._at_once(bot, chat, limits)
        if tried is True:
            return 0.0
        chat_only = Limits(per_bot=math.inf, per_chat=limits.per_chat,
                           chat_burst=limits.chat_burst)
        delay = await self.limiter.reserve(bot, chat, chat_only, max_wait)
        if tried is False and delay <= 0:  # the chat had a token: the bot's bucket was short
            self._contended[bot] = self.monotonic() + CONTENDED_SECONDS
        if delay > max_wait:
            return delay
        if delay > 0:
            await asyncio.sleep(delay)
        if math.isinf(limits.per_bot):
            return 0.0
        bot_only = Limits(per_bot=limits.per_bot, per_chat=math.inf,
                          bot_burst=limits.bot_burst)
        slot: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        queues = self._waiting.setdefault(bot, (deque(), deque()))
        queues[0 if urgent else 1].append((slot, bot_only, max_wait))
        pacer = self._pacers.get(bot)
        if pacer is None or pacer.done():
            self._pacers[bot] = asyncio.create_task(self._pace(bot))
        return await slot

    async def _at_once(self, bot: str, chat: str, limits: Limits) -> bool | None:
        """Both slots in one call (True), when both buckets have a token now and no
        sender of this process waits for the bot's (it would be overtaken). False: a
        bucket was short and nothing was reserved (``max_wait`` 0); if it was the bot's,
        the bot counts as busy for ``CONTENDED_SECONDS`` (``_wait``): at its limit every
        send would pay for a third call. None: not tried."""
        if math.isinf(limits.per_bot):
            return None
        queues = self._waiting.get(bot)
        if queues is not None and (queues[0] or queues[1]):
            return None
        if self._contended and self._contended.get(bot, 0.0) > self.monotonic():
            return None
        return await self.limiter.reserve(bot, chat, limits, 0.0) <= 0

    async def _pace(self, bot: str) -> None:
        queues = self._waiting[bot]
        while queues[0] or queues[1]:
            waiting = queues[0] or queues[1]  # the urgent first, looked at for every slot
            slot, limits, max_wait = waiting[0]
            if slot.done():  # its sender was cancelled
                waiting.popleft()
                continue
            try:
                delay = await self.limiter.reserve(bot, "*", limits, max_wait)
            except Exception as error:
                waiting.popleft()
                if not slot.done():
                    slot.set_exception(error)
                continue
            if 0 < delay <= max_wait:
                await asyncio.sleep(delay)
            waiting.popleft()  # the slot was reserved for this sender: it keeps it
            if not slot.done():
                slot.set_result(delay if delay > max_wait else 0.0)


class _Bucket:
    __slots__ = ("capacity", "rate", "tokens", "updated")

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate, self.capacity, self.tokens, self.updated = rate, capacity, capacity, now

    def refill(self, now: float) -> None:
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    def wait(self) -> float:
        return 0.0 if self.tokens >= 1 else (1 - self.tokens) / self.rate

    def full_by(self) -> float:
        """When this bucket is full again: from then on it is the same as no bucket."""
        return self.updated + (self.capacity - self.tokens) / self.rate


PRUNE_EVERY = 1.0  # seconds between sweeps of the chats' full buckets


class MemoryRateLimiter:
    """Token buckets in this process's memory.

    A broadcast touches every recipient's chat bucket once; a bucket that is full again
    is dropped within a second, so the dict holds the chats of the last moments, not of
    the whole broadcast (100,000 live buckets made each full garbage collection of a
    ``botp run`` take ~100 ms, stalling live replies)."""

    def __init__(self, monotonic=time.monotonic) -> None:
        self.monotonic = monotonic
        self._buckets: dict[tuple[str, str], _Bucket] = {}
        self._paused_until: dict[str, float] = {}
        self._next_prune = monotonic() + PRUNE_EVERY

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
            buckets.append(self._bucket(("bot", bot), limits.per_bot, limits.bot_capacity,
                                        now))
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
        if now >= self._next_prune:
            self._prune(now)
        return delay

    def _prune(self, now: float) -> None:
        """Forget the chats' buckets that are full again."""
        self._next_prune = now + PRUNE_EVERY
        self._buckets = {k: b for k, b in self._buckets.items()
                         if k[0] == "bot" or b.full_by() > now}

    async def pause(self, bot: str, seconds: float) -> None:
        until = self.monotonic() + seconds
        self._paused_until[bot] = max(self._paused_until.get(bot, 0.0), until)


# Both buckets and the pause are checked and taken in one script (``RESERVE_MANY``, for
# every reservation of a moment in turn), so N workers calling at once never overspend;
# the time is Redis's own (TIME), so workers' clocks may disagree. A bucket is a hash
# {tokens, ts}; tokens go below zero for slots reserved in the future.
_PAUSE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local until_ = now + tonumber(ARGV[1])
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if until_ > current then
  redis.call('SET', KEYS[1], tostring(until_), 'PX', math.ceil(tonumber(ARGV[1]) * 1000) + 1000)
end
return 1
"""


class RedisRateLimiter:
    """Token buckets in Redis, shared by every worker process: together they never send
    faster than a bot's limit, and a ``retry_after`` seen by one pauses them all."""

    def __init__(self, redis: Any, prefix: str = "botp:rl:") -> None:
        self.redis = redis  # a ``redis.asyncio.Redis``; the caller owns and closes it
        self.prefix = prefix
        self._batch = ReserveBatcher(redis.register_script(RESERVE_MANY))
        self._pause = redis.register_script(_PAUSE)

    @classmethod
    def from_url(cls, url: str, max_connections: int = 64) -> RedisRateLimiter:
        from redis.asyncio import BlockingConnectionPool, Redis

        # Blocking: with more sends in flight than connections, a call waits for a free
        # connection (the default pool would fail it at once, holding the send back).
        pool = BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=5, socket_timeout=5,
            socket_connect_timeout=5, health_check_interval=30)
        return cls(Redis(connection_pool=pool))

    async def reserve(self, bot: str, chat: str, limits: Limits, max_wait: float) -> float:
        bot_rate = 0.0 if math.isinf(limits.per_bot) else limits.per_bot
        chat_rate = 0.0 if math.isinf(limits.per_chat) else limits.per_chat
        keys = [f"{self.prefix}bot:{bot}", f"{self.prefix}chat:{bot}\x1f{chat}",
                f"{self.prefix}pause:{bot}"]
        # Calls of this moment share one script call (ratelimit_batch).
        return await self._batch.reserve(keys, [
            bot_rate, limits.bot_capacity if bot_rate else 1.0, chat_rate,
            float(limits.chat_burst), max_wait])

    async def pause(self, bot: str, seconds: float) -> None:
        await self._pause(keys=[f"{self.prefix}pause:{bot}"], args=[seconds])

    async def close(self) -> None:
        await self.redis.aclose()
        await self.redis.connection_pool.disconnect()

"""The rate limiters: one contract for the in-memory and the Redis-backed limiter, and the
property the Redis one exists for: several workers together stay under one bot's limit."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator

import pytest

from bot_platform.ratelimit import (
    CONTENDED_SECONDS,
    Limits,
    MemoryRateLimiter,
    Pacer,
    RateLimiter,
    RedisRateLimiter,
)
from tests.support.services import empty_redis

SLACK = 0.15  # seconds: the Redis limiter reads the server's clock between calls


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def limiter(request: pytest.FixtureRequest) -> AsyncIterator[RateLimiter]:
    if request.param == "memory":
        yield MemoryRateLimiter()
        return
    async with empty_redis() as url:
        redis_limiter = RedisRateLimiter.from_url(url)
        yield redis_limiter
        await redis_limiter.close()


async def test_per_chat_burst_then_one_per_second(limiter: RateLimiter) -> None:
    limits = Limits(per_bot=math.inf, per_chat=1, chat_burst=2)
    waits = [await limiter.reserve("tg:b", "chat", limits, max_wait=100) for _ in range(4)]
    assert waits[:2] == pytest.approx([0, 0], abs=SLACK)
    assert waits[2:] == pytest.approx([1, 2], abs=SLACK)
    # Another chat of the same bot is not held back.
    assert await limiter.reserve("tg:b", "other", limits, max_wait=100) == 0


async def test_a_wait_beyond_max_wait_reserves_nothing(limiter: RateLimiter) -> None:
    limits = Limits(per_bot=2, per_chat=math.inf, bot_burst=1)
    assert await limiter.reserve("tg:b", "c", limits, max_wait=10) == pytest.approx(0, abs=SLACK)
    for expected in (0.5, 1.0):
        assert await limiter.reserve("tg:b", "c", limits, max_wait=10) == pytest.approx(
            expected, abs=SLACK)
    refused = await limiter.reserve("tg:b", "c", limits, max_wait=0.2)
    assert refused == pytest.approx(1.5, abs=SLACK)
    # The refused call took no slot: the next one is offered the same moment.
    assert await limiter.reserve("tg:b", "c", limits, max_wait=10) == pytest.approx(
        1.5, abs=SLACK)


async def test_pause_holds_the_whole_bot(limiter: RateLimiter) -> None:
    limits = Limits(per_bot=100, per_chat=math.inf)
    await limiter.pause("tg:b", 20)
    await limiter.pause("tg:b", 5)  # a shorter pause does not shorten the longer one
    assert await limiter.reserve("tg:b", "x", limits, max_wait=100) == pytest.approx(
        20, abs=SLACK)
    assert await limiter.reserve("tg:other", "x", limits, max_wait=100) == 0


async def planned_sends(limiters: list[RateLimiter], per_worker: int,
                        limits: Limits) -> list[float]:
    """Each limiter acts as one worker reserving slots as fast as it can; returns the
    moments the sends were planned for."""
    moments: list[float] = []

    async def worker(limiter: RateLimiter) -> None:
        for _ in range(per_worker):
            delay = await limiter.reserve("tg:shop", "*", limits, max_wait=60)
            moments.append(time.monotonic() + delay)

    await asyncio.gather(*(worker(limiter) for limiter in limiters))
    return sorted(moments)


def busiest_second(moments: list[float]) -> int:
    return max(sum(1 for m in moments[i:] if m - start < 1.0)
               for i, start in enumerate(moments))


@pytest.mark.redis
async def test_workers_sharing_redis_never_exceed_the_bot_limit(redis_url: str) -> None:
    limits = Limits(per_bot=50, per_chat=math.inf)
    limiters = [RedisRateLimiter.from_url(redis_url) for _ in range(3)]
    try:
        moments = await planned_sends(limiters, per_worker=60, limits=limits)
    finally:
        for limiter in limiters:
            await limiter.close()
    assert len(moments) == 180
    assert busiest_second(moments) <= 50 + limits.bot_capacity + 1
    # ... and the budget is used: 180 sends at 50/s take about 3.6 s, not much longer.
    assert moments[-1] - moments[0] == pytest.approx(179 / 50, abs=0.5)


async def test_separate_memory_limiters_would_overspend() -> None:
    """Why the Redis limiter exists: per-process buckets each spend the whole budget."""
    limits = Limits(per_bot=50, per_chat=math.inf)
    moments = await planned_sends([MemoryRateLimiter() for _ in range(3)], per_worker=60,
                                  limits=limits)
    assert busiest_second(moments) > 2 * 50


@pytest.mark.redis
async def test_more_concurrent_sends_than_redis_connections_wait_instead_of_failing(
        redis_url: str) -> None:
    limiter = RedisRateLimiter.from_url(redis_url, max_connections=4)
    limits = Limits(per_bot=math.inf, per_chat=math.inf)
    try:
        delays = await asyncio.gather(*(limiter.reserve("tg:b", f"c{n}", limits, 1)
                                        for n in range(200)))
    finally:
        await limiter.close()
    assert delays == [0.0] * 200


async def test_memory_limiter_forgets_chats_once_their_bucket_is_full_again() -> None:
    """A broadcast touches each recipient's chat once: the limiter keeps the chats of the
    last second, not of the whole broadcast (every live bucket lengthens each full
    garbage collection), and forgets none that still holds a send back."""
    now = [0.0]
    limiter = MemoryRateLimiter(monotonic=lambda: now[0])
    limits = Limits(per_bot=math.inf, per_chat=1, chat_burst=1)
    for n in range(5_000):
        now[0] = n / 1_000  # 1,000 chats a second, one message each
        assert await limiter.reserve("tg:b", f"c{n}", limits, max_wait=10) == 0
    assert len(limiter._buckets) <= 2_100  # the last one to two seconds' chats
    # The latest chats are still held: a second message waits for its slot.
    assert await limiter.reserve("tg:b", "c4999", limits, max_wait=10) == pytest.approx(1.0)
    now[0] = 10.0
    await limiter.reserve("tg:b", "later", limits, max_wait=10)
    assert len(limiter._buckets) == 1


class _CountingLimiter(MemoryRateLimiter):
    """Counts the limiter's calls (a Redis limiter: one script call, one round trip each)."""

    def __init__(self, monotonic) -> None:
        super().__init__(monotonic)
        self.calls = 0

    async def reserve(self, bot: str, chat: str, limits: Limits, max_wait: float) -> float:
        self.calls += 1
        return await super().reserve(bot, chat, limits, max_wait)


async def test_a_send_takes_both_slots_in_one_call_while_nobody_waits() -> None:
    """Both buckets with a token: one call. The bot's bucket short: nothing is taken by
    that call, the send goes the two-step way, and so do the bot's next sends for a while
    (at its limit, trying both at once first would only add a call per send)."""
    now = [0.0]
    limiter = _CountingLimiter(monotonic=lambda: now[0])
    pacer = Pacer(limiter, monotonic=lambda: now[0])
    limits = Limits(per_bot=100, per_chat=1, chat_burst=3)  # the bot's bucket holds one
    assert await pacer.wait("bot", "a", limits, max_wait=10) == 0
    assert limiter.calls == 1
    assert await pacer.wait("bot", "b", limits, max_wait=10) == 0  # the bot's bucket is empty
    assert limiter.calls == 4  # both at once (short), the chat's, the bot's (paced)
    assert await pacer.wait("bot", "c", limits, max_wait=10) == 0
    assert limiter.calls == 6  # the chat's, the bot's: not both at once first
    now[0] += CONTENDED_SECONDS + 1  # buckets full again, the bot no longer busy
    assert await pacer.wait("bot", "d", limits, max_wait=10) == 0
    assert limiter.calls == 7


async def test_a_short_chat_bucket_does_not_end_sends_at_once_for_the_bot() -> None:
    now = [0.0]
    limiter = _CountingLimiter(monotonic=lambda: now[0])
    pacer = Pacer(limiter, monotonic=lambda: now[0])
    limits = Limits(per_bot=1000, per_chat=1, chat_burst=1)
    assert await pacer.wait("bot", "a", limits, max_wait=10) == 0
    assert await pacer.wait("bot", "a", limits, max_wait=0.5) > 0.5  # the chat must wait
    calls = limiter.calls
    assert await pacer.wait("bot", "b", limits, max_wait=10) == 0
    assert limiter.calls == calls + 1

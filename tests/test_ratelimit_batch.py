"""Reservations of one moment share one Redis script call (ratelimit_batch): batched,
they still never exceed a bot's per-bot and per-chat limits, each caller gets its own
answer in order, and a failed call fails every caller in it as a single call's did."""

from __future__ import annotations

import asyncio
import math
import time
from itertools import pairwise
from typing import Any

import pytest

from bot_platform.ratelimit import Limits, Pacer, RedisRateLimiter
from bot_platform.ratelimit_batch import ReserveBatcher
from tests.test_database_away import closed_port
from tests.test_ratelimit import SLACK, busiest_second

pytestmark = pytest.mark.redis


def count_calls(limiter: RedisRateLimiter) -> list[int]:
    """Counts the script calls of ``limiter`` (one entry, the number of requests, per
    call)."""
    batcher: ReserveBatcher = limiter._batch
    script = batcher._script
    calls: list[int] = []

    async def counted(keys: list[str], args: list[Any]) -> Any:
        calls.append(len(keys) // 3)
        return await script(keys=keys, args=args)

    batcher._script = counted
    return calls


async def test_concurrent_reservations_of_three_processes_never_exceed_the_bot_limit(
        redis_url: str) -> None:
    limits = Limits(per_bot=100, per_chat=math.inf)
    limiters = [RedisRateLimiter.from_url(redis_url) for _ in range(3)]
    calls = [count_calls(limiter) for limiter in limiters]
    moments: list[float] = []

    async def send(limiter: RedisRateLimiter, n: int) -> None:
        delay = await limiter.reserve("tg:shop", f"c{n}", limits, max_wait=60)
        moments.append(time.monotonic() + delay)

    try:
        for _ in range(2):  # two waves of 100 concurrent sends per process
            await asyncio.gather(*(send(limiter, n) for limiter in limiters
                                   for n in range(100)))
    finally:
        for limiter in limiters:
            await limiter.close()
    assert len(moments) == 600
    assert busiest_second(sorted(moments)) <= 100 + limits.bot_capacity + 1
    assert sorted(moments)[-1] - min(moments) == pytest.approx(599 / 100, abs=0.5)
    assert all(sum(made) == 200 and len(made) < 200 for made in calls)  # batched


async def test_batched_reservations_keep_each_chat_to_its_limit(redis_url: str) -> None:
    limits = Limits(per_bot=1000, per_chat=1, chat_burst=1)
    limiter = RedisRateLimiter.from_url(redis_url)
    calls = count_calls(limiter)
    try:
        delays = await asyncio.gather(*(limiter.reserve("tg:b", f"chat{n % 10}", limits, 60)
                                        for n in range(200)))
    finally:
        await limiter.close()
    assert calls == [200]  # one moment, one script call
    for chat in range(10):
        mine = sorted(delays[chat::10])
        assert all(later - earlier >= 1 - 1e-3 for earlier, later in pairwise(mine))
        assert mine[0] == pytest.approx(0, abs=SLACK)


async def test_each_caller_of_a_batch_gets_its_own_wait_in_order(redis_url: str) -> None:
    limits = Limits(per_bot=math.inf, per_chat=1, chat_burst=1)
    limiter = RedisRateLimiter.from_url(redis_url)
    calls = count_calls(limiter)
    try:
        waits = await asyncio.gather(*(limiter.reserve("tg:b", "chat", limits, max_wait)
                                       for max_wait in (10, 10, 0.5, 10, 10)))
    finally:
        await limiter.close()
    assert calls == [5]
    # The third is refused (its wait is beyond its max_wait) and takes no slot: the
    # fourth is offered the same moment.
    assert waits == pytest.approx([0, 1, 2, 2, 3], abs=1e-3)


async def test_a_failed_batch_fails_each_caller_as_a_single_call_does() -> None:
    limiter = RedisRateLimiter.from_url(f"redis://127.0.0.1:{closed_port()}/0")
    limits = Limits(per_bot=30, per_chat=1)
    try:
        with pytest.raises(Exception) as single:
            await limiter.reserve("tg:b", "alone", limits, 2.0)
        outcomes = await asyncio.gather(
            *(limiter.reserve("tg:b", f"c{n}", limits, 2.0) for n in range(20)),
            return_exceptions=True)
        assert [type(o) for o in outcomes] == [single.type] * 20
        waits = await asyncio.gather(*(Pacer(limiter).wait("tg:b", f"c{n}", limits, 2.0)
                                       for n in range(20)))
        assert all(wait > 2.0 for wait in waits)  # held, as in a single call's outage
    finally:
        await limiter.close()


async def test_an_outage_mid_batch_fails_its_callers_and_not_the_next_batch(
        redis_url: str) -> None:
    limiter = RedisRateLimiter.from_url(redis_url)
    batcher: ReserveBatcher = limiter._batch
    script = batcher._script
    away = [True]

    async def flaky(keys: list[str], args: list[Any]) -> Any:
        await asyncio.sleep(0)  # the call was under way
        if away[0]:
            raise ConnectionError("Redis went away")
        return await script(keys=keys, args=args)

    batcher._script = flaky
    limits = Limits(per_bot=30, per_chat=1)
    try:
        failed = await asyncio.gather(*(limiter.reserve("tg:b", f"c{n}", limits, 2.0)
                                        for n in range(10)), return_exceptions=True)
        assert all(isinstance(f, ConnectionError) for f in failed)
        away[0] = False
        assert await asyncio.gather(*(limiter.reserve("tg:b", f"c{n}", limits, 2.0)
                                      for n in range(3))) == pytest.approx(
            [0, 1 / 30, 2 / 30], abs=1e-3)
    finally:
        await limiter.close()

"""A Redis outage is said once per bot per interval, not once per send (issue 15, item 7:
workers logged 225-360 warnings each in 20 s); sends are held meanwhile."""

from __future__ import annotations

import logging

import pytest

from bot_platform.ratelimit import OUTAGE_LOG_SECONDS, Limits, Pacer, RedisRateLimiter
from tests.test_database_away import closed_port

LIMITS = Limits(per_bot=30, per_chat=1)


class FakeMonotonic:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def outage_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_many_sends_against_a_redis_that_is_away_log_once_per_bot_per_interval(
        caplog: pytest.LogCaptureFixture) -> None:
    limiter = RedisRateLimiter.from_url(f"redis://127.0.0.1:{closed_port()}/0")
    clock = FakeMonotonic()
    pacer = Pacer(limiter, monotonic=clock)
    try:
        with caplog.at_level(logging.INFO, logger="bot_platform.ratelimit"):
            for send in range(40):
                for bot in ("telegram:a", "viber:b"):
                    wait = await pacer.wait(bot, f"chat{send}", LIMITS, max_wait=2.0)
                    assert wait > 2.0  # held: the caller gives the row back
            assert len(outage_lines(caplog)) == 2  # one per bot, not 80
            assert {"telegram:a", "viber:b"} == {r.args[-2] for r in outage_lines(caplog)}
            assert all(r.exc_info is None for r in outage_lines(caplog))

            clock.now += OUTAGE_LOG_SECONDS + 1  # still away one interval later
            for send in range(10):
                await pacer.wait("telegram:a", f"chat{send}", LIMITS, max_wait=2.0)
            assert len(outage_lines(caplog)) == 3
    finally:
        await limiter.close()


async def test_the_end_of_an_outage_is_said_and_the_next_one_is_said_again(
        caplog: pytest.LogCaptureFixture) -> None:
    class Flaky:
        away = True

        async def reserve(self, bot: str, chat: str, limits: Limits, max_wait: float) -> float:
            if self.away:
                raise ConnectionError("Redis is away")
            return 0.0

        async def pause(self, bot: str, seconds: float) -> None:
            return None

    limiter = Flaky()
    pacer = Pacer(limiter, monotonic=FakeMonotonic())
    with caplog.at_level(logging.INFO, logger="bot_platform.ratelimit"):
        for _ in range(5):
            assert await pacer.wait("b", "c", LIMITS, max_wait=1.0) > 1.0
        limiter.away = False
        assert await pacer.wait("b", "c", LIMITS, max_wait=1.0) == 0.0
        limiter.away = True
        assert await pacer.wait("b", "c", LIMITS, max_wait=1.0) > 1.0
    messages = [r.getMessage() for r in caplog.records]
    assert [m.split(" ")[2] for m in messages] == ["unavailable", "available", "unavailable"]

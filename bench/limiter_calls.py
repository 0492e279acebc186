"""Micro-benchmark of the shared (Redis) rate limiter: reservations/s and this process's
CPU per reservation with N concurrent reservers (the web and workers call it per send).

    PYTHONPATH=$PWD python bench/limiter_calls.py [--reservers 50] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import time

from bot_platform.ratelimit import Limits, RedisRateLimiter

# Limits far above what one process can reach: every reservation is granted at once.
LIMITS = Limits(per_bot=1e9, per_chat=1e9, chat_burst=1_000_000)


async def main(reservers: int, seconds: float, url: str) -> None:
    limiter = RedisRateLimiter.from_url(url)
    done = 0
    stop = False

    async def reserver(n: int) -> None:
        nonlocal done
        while not stop:
            await limiter.reserve("bench:bot", f"chat{n}", LIMITS, 0.0)
            done += 1

    try:
        await limiter.reserve("bench:bot", "warm", LIMITS, 0.0)
        wall, cpu = time.perf_counter(), time.process_time()
        tasks = [asyncio.create_task(reserver(n)) for n in range(reservers)]
        await asyncio.sleep(seconds)
        stop = True
        await asyncio.gather(*tasks)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        print(f"{reservers} reservers: {done / wall:,.0f} reservations/s, "
              f"{cpu / done * 1e6:.1f} us CPU per reservation")
    finally:
        await limiter.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reservers", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/15")
    args = parser.parse_args()
    asyncio.run(main(args.reservers, args.seconds, args.redis))

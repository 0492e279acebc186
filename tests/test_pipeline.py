"""The claim loop (bot_platform/pipeline.py) claims again when there may be more work,
not after every item: a claim that came back short waits for a wake-up (new work) or,
if it came back short while items were in hand (work may wait behind them), for those
items to finish."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from bot_platform.pipeline import Finished, Pipeline


class Queue:
    """Work to claim: ``ready`` items now, ``blocked`` ones that become ready only when
    every item in hand finished (a subscriber's next message behind the one in flight)."""

    def __init__(self, ready: int, blocked: int = 0) -> None:
        self.ready, self.blocked = ready, blocked
        self.claims: list[int] = []  # what each claim got
        self.finish = asyncio.Event()
        self.in_hand = 0
        self.slow: asyncio.Event | None = None  # set: a claim's answer waits for it

    async def claim(self, limit: int) -> tuple[int, int]:
        got = min(limit, self.ready)  # what the claim's snapshot sees
        self.ready -= got
        self.claims.append(got)
        self.in_hand += got
        if self.slow is not None:
            await self.slow.wait()
        return got, got

    async def handle(self, count: int, finished: Finished) -> None:
        await self.finish.wait()
        self.in_hand -= count
        if self.in_hand == 0:
            self.ready, self.blocked = self.ready + self.blocked, 0
        finished(count)


@contextlib.asynccontextmanager
async def running(queue: Queue) -> AsyncIterator[asyncio.Event]:
    """The queue's pipeline running (after a first claim's moment); yields its wake-up
    event; stopped and awaited when the block ends."""
    pipeline = Pipeline("test", 10, queue.claim, queue.handle)
    wake, stop = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(pipeline.run(stop, wake, poll_interval=60, grace=1))
    await asyncio.sleep(0.05)
    try:
        yield wake
    finally:
        stop.set()
        wake.set()
        await asyncio.wait_for(task, 5)


async def test_a_short_claim_waits_for_news_not_for_its_items() -> None:
    queue = Queue(ready=3)
    queue.finish.set()  # items finish at once
    async with running(queue):
        await asyncio.sleep(0.15)
    assert queue.claims == [3]  # no claim that finds nothing after it


async def test_a_wake_up_claims_what_came_meanwhile() -> None:
    queue = Queue(ready=1)
    queue.finish.set()
    async with running(queue) as wake:
        queue.ready += 2
        wake.set()
        await asyncio.sleep(0.05)
    assert queue.claims[:2] == [1, 2]


async def test_work_behind_items_in_hand_is_claimed_when_they_finish() -> None:
    queue = Queue(ready=1)
    async with running(queue) as wake:
        queue.blocked = 1  # queued behind the item in hand; its wake-up finds nothing
        wake.set()
        await asyncio.sleep(0.05)
        assert queue.claims == [1, 0]
        queue.finish.set()  # the item finishes: what waited behind it is claimed
        await asyncio.sleep(0.05)
    assert queue.claims[:3] == [1, 0, 1]


async def test_an_item_finishing_during_a_short_claim_is_not_missed() -> None:
    queue = Queue(ready=1)
    async with running(queue) as wake:
        queue.blocked, queue.slow = 1, asyncio.Event()
        wake.set()  # this claim sees nothing ready...
        await asyncio.sleep(0.05)
        queue.finish.set()  # ...and the item in hand finishes before it answers
        await asyncio.sleep(0.05)
        queue.slow.set()
        await asyncio.sleep(0.05)
    assert queue.claims[:3] == [1, 0, 1]

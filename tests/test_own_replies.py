"""``botp web`` on PostgreSQL sends its own turns' replies (``own_replies``): with no
worker running, in order behind a subscriber's earlier rows, exactly once when the web
dies after the commit or freezes past its lease, and beside workers under concurrency.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select

from bot_platform.config import BotConfig
from bot_platform.delivery import Delivery
from bot_platform.models import Subscriber
from bot_platform.own_replies import OwnReplies
from bot_platform.types import Outgoing, SendResult
from tests.support.platform import wait_for
from tests.support.scripted import (
    ScriptedChannel,
    another_worker,
    outbox_rows,
    start,
    web_sends,
)
from tests.support.telegram import SECRET, TOKEN, callback_update, message_update, post

pytestmark = pytest.mark.postgres


class Monotonic:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def scripted(make_platform: Any, postgres_url: str, channel: ScriptedChannel | None = None
                   ) -> tuple[Any, ScriptedChannel]:
    channel = channel or ScriptedChannel()
    platform = await make_platform(bots=[BotConfig(id="b1", channel="scripted")],
                                   channel_overrides={("scripted", "b1"): channel},
                                   database_url=postgres_url)
    return platform, channel


async def all_sent(platform: Any) -> bool:
    rows = await outbox_rows(platform)
    return bool(rows) and all(row.status == "sent" for row in rows)


async def queue_earlier(platform: Any, user: str, text: str) -> None:
    """A row queued for the subscriber by someone else (a timer's message), waiting."""
    async with platform.engine.turns.isolated(("scripted", "b1", user)) as session:
        subscriber = await session.scalar(select(Subscriber).where(Subscriber.user_id == user))
        await platform.outbox.enqueue(session, subscriber, [(None, Outgoing(text=text))])


async def test_the_web_alone_answers_a_quiz_through_the_fake_telegram(
        make_platform, postgres_url, fake) -> None:
    platform = await make_platform(bots=[BotConfig(
        id="shop", channel="telegram", token=TOKEN, secret=SECRET, api_base=fake.url)],
        database_url=postgres_url)
    async with web_sends(platform):
        assert (await post(platform, message_update(1, "/start"))).status_code == 200
        await wait_for(lambda: _sent_count(fake, 1), what="the greeting")
        assert (await post(platform, message_update(2, "quiz"))).status_code == 200
        await wait_for(lambda: _sent_count(fake, 2), what="the first question")
        question = fake.sent(1111)[-1]
        payload = question.params["reply_markup"]["inline_keyboard"][0][0]["callback_data"]
        assert (await post(platform, callback_update(3, payload))).status_code == 200
        await wait_for(lambda: _sent_count(fake, 3), what="the second question")
        await wait_for(lambda: all_sent(platform), what="every row recorded sent")
    rows = await outbox_rows(platform)
    assert len(fake.sent(1111)) == len(rows) >= 3
    assert {(row.status, row.locked_by) for row in rows} == {("sent", None)}


async def _sent_count(fake: Any, count: int) -> bool:
    return len(fake.sent(1111)) >= count


async def test_a_reply_behind_an_earlier_unsent_row_goes_out_after_it(
        make_platform, postgres_url) -> None:
    """The subscriber has a row a worker is to send (a timer's): the web leaves its
    reply to the workers, which send both in order."""
    platform, channel = await scripted(make_platform, postgres_url)
    async with web_sends(platform):
        await platform.engine.handle(start())
        await wait_for(lambda: all_sent(platform), what="the welcome")
        await queue_earlier(platform, "u1", "from a timer")
        await platform.engine.handle(start(event="e2"))
        await asyncio.sleep(0.2)
        assert len(channel.calls) == len([r for r in await outbox_rows(platform)
                                          if r.status == "sent"])
        worker = another_worker(platform)
        while await worker.run_once():
            pass
    rows = await outbox_rows(platform)
    assert [row.status for row in rows] == ["sent"] * len(rows)
    sent_order = [m.text for _, m, _ in channel.calls]
    stored_order = [row.payload["text"] for row in rows]
    assert sent_order == stored_order  # every row once, in id order


class Gate(ScriptedChannel):
    """Sends only once ``open`` is set (the first call holds the chat's later rows)."""

    def __init__(self) -> None:
        super().__init__()
        self.open = asyncio.Event()

    async def send(self, recipient: str, message: Outgoing) -> SendResult:
        await self.open.wait()
        return await super().send(recipient, message)


async def test_a_reply_behind_the_webs_own_send_waits_for_it_not_for_a_worker(
        make_platform, postgres_url) -> None:
    channel = Gate()
    platform, _ = await scripted(make_platform, postgres_url, channel)
    async with web_sends(platform):
        first = asyncio.create_task(platform.engine.handle(start()))
        await first
        await platform.engine.handle(start(event="e2"))  # behind the first, held here
        channel.open.set()
        await wait_for(lambda: all_sent(platform), what="both replies, no worker running")
    rows = await outbox_rows(platform)
    assert [m.text for _, m, _ in channel.calls] == [row.payload["text"] for row in rows]


async def test_a_web_that_dies_after_the_commit_leaves_its_rows_to_a_worker(
        make_platform, postgres_url) -> None:
    platform, channel = await scripted(make_platform, postgres_url)
    async with web_sends(platform) as replies:
        replies.taken = lambda identity, taken: None  # committed, then gone: nothing sent
        await platform.engine.handle(start())
    rows = await outbox_rows(platform)
    assert {(row.status, row.locked_by) for row in rows} == {
        ("sending", platform.worker_id)}
    worker = another_worker(platform)
    assert await worker.run_once() == 0  # the web's lease still runs
    platform.clock.advance(timedelta(seconds=platform.settings.worker.lease_seconds + 1))
    while await worker.run_once():
        pass
    rows = await outbox_rows(platform)
    assert {(row.status, row.locked_by) for row in rows} == {("sent", None)}
    assert [m.text for _, m, _ in channel.calls] == [row.payload["text"] for row in rows]


async def test_a_web_frozen_past_its_lease_does_not_send_what_a_worker_took_over(
        make_platform, postgres_url) -> None:
    platform, channel = await scripted(make_platform, postgres_url)
    monotonic = Monotonic()
    platform.worker.delivery.monotonic = monotonic
    captured: list[tuple[Any, Any]] = []
    async with web_sends(platform) as replies:
        replies.taken = lambda identity, taken: captured.append((identity, taken))
        await platform.engine.handle(start())
        lease = platform.settings.worker.lease_seconds
        monotonic.now += lease + 1  # frozen between the commit and the send
        platform.clock.advance(timedelta(seconds=lease + 1))
        worker = another_worker(platform)
        while await worker.run_once():
            pass
        sent = len(channel.calls)
        assert sent == len(await outbox_rows(platform)) >= 1
        OwnReplies.taken(replies, *captured[0])  # wakes up and goes on
        await wait_for(lambda: _dropped(platform), what="the stale rows dropped")
    assert len(channel.calls) == sent
    assert platform.worker.delivery.in_hand == {}
    assert {(row.status, row.locked_by) for row in await outbox_rows(platform)} == {
        ("sent", None)}


async def _dropped(platform: Any) -> bool:
    return platform.worker.delivery.dropped >= 1


async def test_many_webhooks_with_two_workers_each_row_once_in_order(
        make_platform, postgres_url) -> None:
    platform, channel = await scripted(make_platform, postgres_url)
    users = [f"u{n}" for n in range(6)]
    stop = asyncio.Event()
    workers = [Delivery(platform.db, platform.channel, platform.bot, platform.limiter,
                        platform.clock, platform.settings.worker, f"worker-{n}")
               for n in range(2)]
    loops = [asyncio.create_task(worker.pipeline("interactive").run(
        stop, asyncio.Event(), 0.05, 5.0)) for worker in workers]
    async with web_sends(platform):
        for user in users:  # subscribers exist for the timers' rows below
            await platform.engine.handle(start(user, f"{user}-0"))

        async def talk(user: str) -> None:
            for n in range(1, 6):
                await platform.engine.handle(start(user, f"{user}-{n}"))
                if n % 2:
                    await queue_earlier(platform, user, f"timer {user} {n}")

        await asyncio.gather(*(talk(user) for user in users),
                             *(platform.engine.handle(start(user, f"{user}-x"))
                               for user in users))
        await wait_for(lambda: all_sent(platform), limit=60, what="every row sent")
    stop.set()
    await asyncio.gather(*loops)
    rows = await outbox_rows(platform)
    assert len(channel.calls) == len(rows)  # each row once
    for user in users:
        assert [m.text for r, m, _ in channel.calls if r == user] == [
            row.payload["text"] for row in rows if row.recipient == user]


class FailFirst(Gate):
    """The first send is a transient failure (a retry later); then sends."""

    async def send(self, recipient: str, message: Outgoing) -> SendResult:
        await self.open.wait()
        if not self.calls:
            self.calls.append((recipient, message, "transient"))
            return SendResult.transient("try again")
        return await ScriptedChannel.send(self, recipient, message)


async def drain_after_backoff(platform: Any) -> None:
    platform.clock.advance(timedelta(minutes=5))
    worker = another_worker(platform)
    while await worker.run_once():
        pass


async def test_rows_behind_a_row_that_did_not_go_out_go_back_to_the_workers_in_order(
        make_platform, postgres_url) -> None:
    channel = FailFirst()
    platform, _ = await scripted(make_platform, postgres_url, channel)
    async with web_sends(platform) as replies:
        await platform.engine.handle(start())
        await platform.engine.handle(start(event="e2"))  # claimed behind the first
        assert {row.status for row in await outbox_rows(platform)} == {"sending"}
        channel.open.set()
        await wait_for(lambda: _line_ended(replies), what="the line to end")
    rows = await outbox_rows(platform)
    assert [row.status for row in rows] == ["pending"] * len(rows)
    assert {row.locked_by for row in rows} == {None}
    await drain_after_backoff(platform)
    rows = await outbox_rows(platform)
    sent = [m.text for _, m, status in channel.calls if status == "sent"]
    assert sent == [row.payload["text"] for row in rows]  # the retried row first
    assert {row.status for row in rows} == {"sent"}


async def _line_ended(replies: OwnReplies) -> bool:
    return not replies._lines and not replies._tasks


async def test_a_turn_that_counted_on_a_line_that_failed_before_its_commit_gives_back(
        make_platform, postgres_url) -> None:
    channel = FailFirst()
    platform, _ = await scripted(make_platform, postgres_url, channel)
    captured: list[tuple[Any, Any]] = []
    async with web_sends(platform) as replies:
        await platform.engine.handle(start())
        replies.taken = lambda identity, taken: captured.append((identity, taken))
        await platform.engine.handle(start(event="e2"))  # claimed behind the first
        channel.open.set()  # the first fails before the second turn "commits"
        await wait_for(lambda: _line_ended(replies), what="the line to end")
        OwnReplies.taken(replies, *captured[0])
        await wait_for(lambda: _line_ended(replies), what="the rows given back")
    assert {(row.status, row.locked_by) for row in await outbox_rows(platform)} == {
        ("pending", None)}
    await drain_after_backoff(platform)
    rows = await outbox_rows(platform)
    sent = [m.text for _, m, status in channel.calls if status == "sent"]
    assert sent == [row.payload["text"] for row in rows]
    assert {row.status for row in rows} == {"sent"}

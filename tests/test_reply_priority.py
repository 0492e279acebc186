"""Replies never wait behind broadcasts: while a 10,000-recipient broadcast goes out at a
realistic rate, a user who talks to the bot (and is one of the broadcast's recipients,
the last one in its order) gets each answer after a bounded number of broadcast sends,
counted in the order the messenger fake received them, long before the broadcast ends.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from sqlalchemy import insert, select

from bot_platform.apikeys import create_key
from bot_platform.clock import SystemClock
from bot_platform.config import BotConfig, WorkerSettings
from bot_platform.models import Contact, Subscriber
from bot_platform.ratelimit import Limits, MemoryRateLimiter, Pacer
from tests.fakes.telegram_api import FakeTelegramServer
from tests.support.platform import wait_for

TOKEN = "123456:ABC-reply"
SECRET = "s"
RECIPIENTS = 10_000
RATE = 200  # messages/s, the bot's configured limit
TALKER = 1111
# Broadcast sends the messenger may receive between a user's message and its answer: a
# claim and a rate-limit slot's worth, never the broadcast's size (nor a pipeline's).
# 9-22 on an idle machine; a machine loaded 5-10 deep stretches the answer's own work
# over more of the broadcast's sends, so the bound leaves room (1.5% of the broadcast).
BOUND = 150


def message(update_id: int, text: str) -> bytes:
    return json.dumps({"update_id": update_id, "message": {
        "message_id": update_id, "date": 1767225600, "text": text,
        "from": {"id": TALKER, "is_bot": False, "first_name": "Olena", "language_code": "en"},
        "chat": {"id": TALKER, "type": "private"},
        **({"entities": [{"offset": 0, "length": len(text), "type": "bot_command"}]}
           if text.startswith("/") else {})}}).encode()


async def post(client, update_id: int, text: str) -> None:
    response = await client.post("/webhooks/telegram/shop", content=message(update_id, text),
                                 headers={"Content-Type": "application/json",
                                          "X-Telegram-Bot-Api-Secret-Token": SECRET})
    assert response.status_code == 200


def broadcast_sends(fake: FakeTelegramServer, calls=None) -> int:
    return sum(1 for call in (fake.sent() if calls is None else calls)
               if str(call.params.get("text", "")).startswith("Spring sale"))


@pytest.mark.slow
@pytest.mark.postgres
async def test_answers_during_a_big_broadcast_wait_for_a_slot_not_the_broadcast(
        make_platform, postgres_url) -> None:
    async with FakeTelegramServer() as fake:
        platform = await make_platform(
            bots=[BotConfig(id="shop", channel="telegram", token=TOKEN, secret=SECRET,
                            api_base=fake.url, messages_per_second=RATE)],
            database_url=postgres_url, clock=SystemClock(),
            worker=WorkerSettings(poll_interval=0.05, lease_seconds=30))
        now = platform.clock.now()
        async with platform.db.session() as session:
            await session.execute(insert(Contact), [{"created_at": now}] * RECIPIENTS)
            contacts = (await session.scalars(select(Contact.id).order_by(Contact.id))).all()
            await session.execute(insert(Subscriber), [
                {"contact_id": contact, "channel": "telegram", "bot_id": "shop",
                 "user_id": str(2_000_000 + n), "status": "subscribed", "locale": "en",
                 "attributes": {}, "last_inbound_at": now, "created_at": now,
                 "updated_at": now} for n, contact in enumerate(contacts)])
        async with platform.http_client() as client:
            await post(client, 1, "/start")  # the talker: the broadcast's last recipient
            await platform.drain()
            greeted = len(fake.sent(TALKER))
            assert greeted >= 1
            _, key = await create_key(platform.db, name="m", role="marketer", now=now)
            client.headers["Authorization"] = f"Bearer {key}"
            created = await client.post("/api/broadcasts", json={
                "name": "big", "filter": {"status": "subscribed"},
                "variants": [{"name": "A", "percent": 100,
                              "messages": {"en": {"text": "Spring sale: 20% off!"}}}]})
            broadcast_id = created.json()["id"]
            assert (await client.post(f"/api/broadcasts/{broadcast_id}/start")).is_success

            stop = asyncio.Event()
            worker = asyncio.create_task(platform.worker.run(stop, grace=1.0))
            try:
                gaps = []
                for round_ in range(3):
                    await wait_for(lambda r=round_: _sent_at_least(fake, 500 * (r + 1)),
                                   limit=120, what="the broadcast to be under way")
                    answered = _answers(fake)
                    before = len(fake.sent())
                    await post(client, 10 + round_, "/start")

                    async def answered_again(n=answered) -> bool:
                        return _answers(fake) > n or broadcast_sends(fake) >= RECIPIENTS

                    await wait_for(answered_again, limit=180, what="the answer")
                    calls = fake.sent()
                    at = next(i for i, call in enumerate(calls) if i >= before
                              and int(call.params["chat_id"]) == TALKER
                              and not call.params["text"].startswith("Spring sale"))
                    gaps.append(broadcast_sends(fake, calls[before:at]))
                    assert broadcast_sends(fake, calls[:at]) < RECIPIENTS - 1000
            finally:
                stop.set()
                await worker
        print(f"broadcast sends between a message and its answer: {gaps}")
        assert max(gaps) <= BOUND, gaps


async def _sent_at_least(fake: FakeTelegramServer, count: int) -> bool:
    return len(fake.sent()) >= count


def _answers(fake: FakeTelegramServer) -> int:
    return sum(1 for call in fake.sent(TALKER)
               if not call.params["text"].startswith("Spring sale"))


async def test_an_urgent_sender_takes_the_next_slot_before_waiting_bulk_senders() -> None:
    """The pacer hands bot-wide slots to urgent senders (replies) before bulk ones
    (broadcast rows already waiting in this process), whatever the bulk queue's length."""
    pacer = Pacer(MemoryRateLimiter())
    limits = Limits(per_bot=200, per_chat=float("inf"))
    order: list[str] = []
    under_way = asyncio.Event()

    async def send(name: str, urgent: bool) -> None:
        assert await pacer.wait("tg:shop", name, limits, 5.0, urgent=urgent) == 0
        order.append(name)
        under_way.set()

    bulk = [asyncio.create_task(send(f"bulk{n}", False)) for n in range(40)]
    await under_way.wait()  # the broadcast is under way
    reply = asyncio.create_task(send("reply", True))
    await asyncio.gather(reply, *bulk)
    assert order.index("reply") <= order.index("bulk0") + 3, order

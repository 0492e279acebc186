"""A broadcast to 10,000 subscribers across the Telegram, Viber and Facebook fakes: no 429
provoked, exactly one message per eligible subscriber, blocked and outside-window ones
counted, figures that add up. (The fakes' limits and the platform's rates are raised so the
test takes seconds; bench/broadcast.py measures the real ratio.)"""

from __future__ import annotations

from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import insert, select

from bot_platform.apikeys import create_key
from bot_platform.config import BotConfig, WorkerSettings
from bot_platform.models import Contact, Subscriber
from tests.fakes.graph_api import FakeGraphServer
from tests.fakes.telegram_api import FakeTelegramServer
from tests.fakes.viber_api import FakeViberServer

pytestmark = pytest.mark.slow

TELEGRAM, VIBER, FACEBOOK = 4000, 3000, 3000
VIBER_TOKEN = "viber-token"


@pytest.fixture
async def fakes() -> Any:
    async with FakeTelegramServer() as tg, FakeViberServer(VIBER_TOKEN) as vb, \
            FakeGraphServer() as fb:
        yield tg, vb, fb


async def test_ten_thousand_recipients_on_three_messengers(make_platform, fakes) -> None:
    tg, vb, fb = fakes
    tg.rate_limit(per_second=3000, retry_after=5)  # the fake's limit ...
    platform = await make_platform(bots=[
        BotConfig(id="tg", channel="telegram", token="123456:ABC-DEF", secret="s",
                  api_base=tg.url, messages_per_second=2000),  # ... and our budget under it
        BotConfig(id="vb", channel="viber", token=VIBER_TOKEN, api_base=vb.url),
        BotConfig(id="fb", channel="facebook", token="PAGE", secret="app", api_base=fb.url,
                  messages_per_second=2000),
    ], worker=WorkerSettings(batch_size=1000, concurrency=64, poll_interval=0.05))
    now = platform.clock.now()
    people = ([("telegram", "tg", str(100000 + n)) for n in range(TELEGRAM)]
              + [("viber", "vb", f"viber-{n}=") for n in range(VIBER)]
              + [("facebook", "fb", f"psid-{n}") for n in range(FACEBOOK)])
    async with platform.db.session() as session:
        await session.execute(insert(Contact), [{"created_at": now} for _ in people])
        contact_ids = (await session.scalars(select(Contact.id).order_by(Contact.id))).all()
        await session.execute(insert(Subscriber), [{
            "contact_id": contact_id, "channel": channel, "bot_id": bot, "user_id": user,
            "status": "subscribed", "locale": "en", "attributes": {},
            # 100 Facebook subscribers last wrote 25 hours ago: outside the window.
            "last_inbound_at": now - timedelta(hours=25 if user.startswith("psid-")
                                               and int(user[5:]) < 100 else 1),
            "created_at": now, "updated_at": now}
            for contact_id, (channel, bot, user) in zip(contact_ids, people, strict=True)])
    for n in range(50):  # 50 who blocked the bot on each messenger
        tg.block(100000 + n)
        vb.unsubscribed.add(f"viber-{n}=")
        fb.unavailable.add(f"psid-{FACEBOOK - 1 - n}")

    _, key = await create_key(platform.db, name="m", role="marketer", now=now)
    async with platform.http_client() as client:
        client.headers["Authorization"] = f"Bearer {key}"
        created = await client.post("/api/broadcasts", json={
            "name": "big", "filter": {"status": "subscribed"},
            "variants": [{"name": "A", "percent": 100,
                          "messages": {"en": {"text": "Spring sale: 20% off!"}}}]})
        broadcast_id = created.json()["id"]
        await client.post(f"/api/broadcasts/{broadcast_id}/start")
        await platform.drain()
        figures = (await client.get(f"/api/broadcasts/{broadcast_id}")).json()

    assert tg.too_many_requests == 0
    telegram_chats = Counter(int(c.params["chat_id"]) for c in tg.sent())
    assert len(telegram_chats) == TELEGRAM - 50 and set(telegram_chats.values()) == {1}
    viber_receivers = Counter()
    for call in vb.calls:
        if call.ok and call.method == "broadcast_message":
            failed = {f["receiver"] for f in call.body.get("failed_list", [])}
            viber_receivers.update(r for r in call.body["broadcast_list"]
                                   if r not in vb.unsubscribed and r not in failed)
        elif call.ok and call.method == "send_message":
            viber_receivers.update([call.body["receiver"]])
    assert len(viber_receivers) == VIBER - 50 and set(viber_receivers.values()) == {1}
    assert all(len(c.body["broadcast_list"]) <= 300 for c in vb.calls
               if c.method == "broadcast_message")
    facebook_psids = Counter(c.body["recipient"]["id"] for c in fb.sent())
    assert len(facebook_psids) == FACEBOOK - 100 - 50 and set(facebook_psids.values()) == {1}

    stats = figures["stats"]["A"]
    assert stats["targeted"] == 10_000 and stats["queued"] == 10_000
    assert stats["sent"] == (TELEGRAM - 50) + (VIBER - 50) + (FACEBOOK - 150)
    assert stats["failed"] == {"blocked": 150}
    assert stats["skipped"] == {"outside_window": 100}
    assert stats["sent"] + 150 + 100 == stats["targeted"]

"""Human handoff: escalation by keyword, the agents' queue, atomic claims, replies through
the messenger, notes, transfer, resolve, and what other agents may see."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select

from bot_platform.apikeys import create_key
from bot_platform.config import BotConfig
from bot_platform.models import Job
from tests.fakes.telegram_api import FakeTelegramServer
from tests.support.telegram import SECRET, TOKEN, message_update, post


@pytest.fixture
async def desk(make_platform) -> Any:
    async with FakeTelegramServer() as fake:
        platform = await make_platform(bots=[BotConfig(
            id="shop", channel="telegram", token=TOKEN, secret=SECRET, api_base=fake.url)])
        keys = {}
        for name, role in (("ann", "agent"), ("bob", "agent"), ("boss", "admin")):
            key_id, key = await create_key(platform.db, name=name, role=role,
                                           now=platform.clock.now())
            keys[name] = (key_id, {"Authorization": f"Bearer {key}"})
        client = platform.http_client()
        yield platform, fake, client, keys
        await client.aclose()


async def test_operator_to_agent_and_back_to_the_bot(desk) -> None:
    platform, fake, client, keys = desk
    ann = keys["ann"][1]
    await post(platform, message_update(1, "/start"))
    await post(platform, message_update(2, "оператор"))
    await platform.drain()
    assert fake.texts(1111)[-1].startswith("Дякуємо! Незабаром тут вам відповість")

    [waiting] = (await client.get("/api/conversations", headers=ann)).json()
    assert (waiting["reason"], waiting["customer"]) == ("asked_for_human", "Olena")
    claimed = await client.post(f"/api/conversations/{waiting['id']}/claim", headers=ann)
    assert claimed.json()["status"] == "assigned"
    sent = await client.post(f"/api/conversations/{waiting['id']}/messages", headers=ann,
                             json={"text": "Hi Olena, I am Ann. How can I help?"})
    assert sent.status_code == 202
    await platform.drain()
    assert fake.texts(1111)[-1] == "Hi Olena, I am Ann. How can I help?"

    await post(platform, message_update(3, "my parcel is late"))
    await platform.drain()
    assert fake.texts(1111)[-1] == "Hi Olena, I am Ann. How can I help?"  # the bot is quiet
    await client.post(f"/api/conversations/{waiting['id']}/notes", headers=ann,
                      json={"text": "check the courier"})
    detail = (await client.get(f"/api/conversations/{waiting['id']}", headers=ann)).json()
    texts = [(h["direction"], h["text"]) for h in detail["history"]]
    assert ("in", "оператор") in texts and ("in", "my parcel is late") in texts
    assert ("note", "check the courier") in texts
    reply = next(h for h in detail["history"] if h["text"].startswith("Hi Olena"))
    assert (reply["status"], reply["author"]) == ("sent", "ann")

    resolved = await client.post(f"/api/conversations/{waiting['id']}/resolve", headers=ann,
                                 json={"start_flow": "nps"})
    assert resolved.json()["status"] == "resolved"
    await platform.drain()
    assert fake.texts(1111)[-1].startswith("Наскільки ймовірно")  # the flow after it
    await post(platform, message_update(4, "/start"))
    await platform.drain()
    assert fake.texts(1111)[-1].startswith("Вітаємо")  # the bot is back


async def test_two_agents_claim_at_once_one_wins(desk) -> None:
    platform, _, client, keys = desk
    await post(platform, message_update(1, "оператор"))
    [waiting] = (await client.get("/api/conversations", headers=keys["ann"][1])).json()
    results = await asyncio.gather(*(
        client.post(f"/api/conversations/{waiting['id']}/claim", headers=keys[who][1])
        for who in ("ann", "bob")))
    assert sorted(r.status_code for r in results) == [200, 409]


async def test_others_cannot_read_an_assigned_chat_until_transferred(desk) -> None:
    platform, _, client, keys = desk
    ann, (bob_id, bob), boss = keys["ann"][1], keys["bob"], keys["boss"][1]
    await post(platform, message_update(1, "оператор"))
    [waiting] = (await client.get("/api/conversations", headers=ann)).json()
    path = f"/api/conversations/{waiting['id']}"
    await client.post(f"{path}/claim", headers=ann)
    assert (await client.get(path, headers=bob)).status_code == 403
    assert (await client.post(f"{path}/messages", headers=bob,
                              json={"text": "hi"})).status_code == 403
    assert (await client.get("/api/conversations?status=assigned", headers=bob)).json() == []
    assert (await client.get(path, headers=boss)).status_code == 200
    moved = await client.post(f"{path}/transfer", headers=ann, json={"agent_id": bob_id})
    assert moved.json()["agent_id"] == str(bob_id)
    assert (await client.get(path, headers=bob)).status_code == 200
    assert (await client.get(path, headers=ann)).status_code == 403


async def test_timers_and_broadcasts_do_not_reach_a_customer_in_a_chat(desk) -> None:
    platform, fake, client, _ = desk
    await post(platform, message_update(1, "/start"))
    await post(platform, message_update(2, "оператор"))
    await platform.drain()
    before = len(fake.sent(1111))
    _, marketer = await create_key(platform.db, name="m", role="marketer",
                                   now=platform.clock.now())
    headers = {"Authorization": f"Bearer {marketer}"}
    created = await client.post("/api/broadcasts", headers=headers, json={
        "name": "b", "filter": {"channel": "telegram"},
        "variants": [{"name": "A", "percent": 100, "messages": {"en": {"text": "Sale!"}}}]})
    await client.post(f"/api/broadcasts/{created.json()['id']}/start", headers=headers)
    platform.clock.advance(timedelta(days=1, minutes=1))  # the welcome chain's timer
    await platform.drain()
    assert len(fake.sent(1111)) == before
    stats = (await client.get(f"/api/broadcasts/{created.json()['id']}",
                              headers=headers)).json()["stats"]["A"]
    assert stats["skipped"] == {"in_conversation": 1}
    async with platform.db.session() as session:
        results = (await session.scalars(select(Job.result).where(
            Job.kind == "flow_timer", Job.status == "done"))).all()
    assert results == ["suppressed"]


async def test_sla_figures_and_the_closed_hours_message(desk, make_platform) -> None:
    from datetime import UTC, datetime

    from bot_platform.clock import ManualClock
    from bot_platform.handoff import SupportHours

    platform, fake, client, keys = desk
    ann = keys["ann"][1]
    await post(platform, message_update(1, "оператор"))
    [waiting] = (await client.get("/api/conversations", headers=ann)).json()
    path = f"/api/conversations/{waiting['id']}"
    await client.post(f"{path}/claim", headers=ann)
    platform.clock.advance(timedelta(minutes=2))
    await client.post(f"{path}/messages", headers=ann, json={"text": "Hello!"})
    platform.clock.advance(timedelta(minutes=8))
    await client.post(f"{path}/resolve", headers=ann, json={})
    [row] = (await client.get("/api/stats/support", headers=ann)).json()
    assert (row["agent"], row["resolved"]) == ("ann", 1)
    assert (row["avg_first_reply_seconds"], row["avg_resolve_seconds"]) == (120.0, 600.0)

    # Saturday evening, support works Mon-Fri 9-18 in Kyiv: the customer is told when.
    platform.engine.handoff.support_hours = SupportHours(timezone="Europe/Kyiv")
    platform.clock.__init__(datetime(2026, 1, 3, 18, 0, tzinfo=UTC))
    assert isinstance(platform.clock, ManualClock)
    await post(platform, message_update(5, "оператор", uid=2222))
    await platform.drain()
    assert fake.texts(2222)[-1] == ("Дякуємо! Зараз наша команда не на зв'язку; ми "
                                    "відповімо вам тут з Mon 09:00.")


async def test_live_stream_shows_escalations_and_messages(desk) -> None:
    import json as jsonlib

    import admin_api.conversations as live

    platform, _, client, keys = desk
    live.LIVE_POLL_SECONDS = 0.05
    ann = keys["ann"][1]
    events: list[tuple[str, dict]] = []

    async def listen() -> None:
        async with client.stream("GET", "/api/conversations/live/stream",
                                 headers=ann) as response:
            kind = None
            async for line in response.aiter_lines():
                if line.startswith("event: "):
                    kind = line.removeprefix("event: ")
                elif line.startswith("data: ") and kind != "ready":
                    events.append((kind, jsonlib.loads(line.removeprefix("data: "))))

    # httpx's in-process ASGI transport buffers whole responses: serve for real.
    import socket

    import httpx
    import uvicorn

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(platform.app(), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="off"))
    serving = asyncio.create_task(server.serve())
    for _ in range(250):
        if server.started:
            break
        await asyncio.sleep(0.02)
    client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}")
    task = asyncio.create_task(listen())
    await asyncio.sleep(0.3)
    await post(platform, message_update(1, "оператор"))
    for _ in range(60):
        if any(k == "conversation" for k, _ in events):
            break
        await asyncio.sleep(0.05)
    [conversation] = [d for k, d in events if k == "conversation"]
    await client.post(f"/api/conversations/{conversation['id']}/claim", headers=ann)
    await post(platform, message_update(2, "де моя посилка?"))
    for _ in range(60):
        if any(k == "message" and d["text"] == "де моя посилка?" for k, d in events):
            break
        await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await client.aclose()
    server.should_exit = True
    await serving
    texts = [d["text"] for k, d in events if k == "message"]
    assert "де моя посилка?" in texts and "оператор" in texts
    assert [d["status"] for k, d in events if k == "conversation"][:2] == ["waiting",
                                                                          "assigned"]

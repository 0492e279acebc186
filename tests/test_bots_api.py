"""Bots registered through the admin API: live at once, tokens write-only, webhooks set up,
picked up by other processes."""

from __future__ import annotations

import json
import logging

from bot_platform.apikeys import create_key
from tests.fakes.telegram_api import FakeTelegramServer
from tests.support.telegram import message_update

TOKEN = "987654:XYZ-secret-token-value"


async def test_register_use_update_and_disable_a_bot(make_platform, caplog, tmp_path) -> None:
    async with FakeTelegramServer() as fake:
        url = f"sqlite+aiosqlite:///{tmp_path}/bots.sqlite3"
        platform = await make_platform(public_url="https://bots.example.com",
                                       database_url=url)
        _, key = await create_key(platform.db, name="a", role="admin",
                                  now=platform.clock.now())
        headers = {"Authorization": f"Bearer {key}"}
        with caplog.at_level(logging.INFO):  # what a deployment logs
            async with platform.http_client() as client:
                created = await client.post("/api/bots", headers=headers, json={
                    "channel": "telegram", "bot_id": "shop2", "token": TOKEN,
                    "secret": "hook-secret", "api_base": fake.url,
                    "messages_per_second": 25})
                listed = await client.get("/api/bots", headers=headers)
                update = await client.post(
                    "/webhooks/telegram/shop2", content=json.dumps(message_update(1, "/start")),
                    headers={"X-Telegram-Bot-Api-Secret-Token": "hook-secret",
                             "Content-Type": "application/json"})
        assert created.status_code == 201, created.text
        body = created.json()
        assert body["webhook"] == "registered" and body["has_token"] is True
        assert body["webhook_url"] == "https://bots.example.com/webhooks/telegram/shop2"
        assert fake.webhook["secret_token"] == "hook-secret"
        for text in (created.text, listed.text):
            assert TOKEN not in text and "hook-secret" not in text
        # (the fake Telegram server's own access log shows the token in its URLs, as
        # Telegram's would; everything on our side must not)
        assert all(TOKEN not in r.getMessage() for r in caplog.records
                   if r.name != "aiohttp.access")
        assert update.status_code == 200
        await platform.drain()
        assert fake.texts(1111)[0].startswith("Вітаємо")

        # Another process (a worker) on the same database picks the bot up.
        other = await make_platform(database_url=url)
        assert other.channel("telegram", "shop2") is not None
        assert other.bot("telegram", "shop2").messages_per_second == 25

        async with platform.http_client() as client:
            patched = await client.patch("/api/bots/telegram/shop2", headers=headers,
                                         json={"messages_per_second": 100})
            assert patched.json()["messages_per_second"] == 100
            again = await client.post("/api/bots", headers=headers, json={
                "channel": "telegram", "bot_id": "shop2", "token": TOKEN})
            assert again.status_code == 409
            assert (await client.delete("/api/bots/telegram/shop2",
                                        headers=headers)).status_code == 204
            gone = await client.post("/webhooks/telegram/shop2", content=b"{}")
            assert gone.status_code == 404

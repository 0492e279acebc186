"""A bot registered or removed through the admin API of one process starts or stops polling
in another running process on the same database, without a restart (issue 14, item 6)."""

from __future__ import annotations

import asyncio

from bot_platform.apikeys import create_key
from tests.fakes.telegram_api import FakeTelegramServer
from tests.support.platform import wait_for
from tests.support.telegram import message_update

TOKEN = "246810:registered-through-the-api"


async def test_a_bot_registered_in_one_process_polls_in_another(make_platform,
                                                               db_url) -> None:
    async with FakeTelegramServer() as fake:
        api = await make_platform(database_url=db_url)  # the web process the admin uses
        other = await make_platform(database_url=db_url)  # another running process
        registry = other.registry
        registry.BOTS_REFRESH_SECONDS, registry.RETRY_FIRST, registry.RETRY_MAX = 0.1, 0.05, 0.2
        serving = asyncio.create_task(other.serve_bots(receive=True))
        _, key = await create_key(api.db, name="a", role="admin", now=api.clock.now())
        headers = {"Authorization": f"Bearer {key}"}
        try:
            async with api.http_client() as client:
                created = await client.post("/api/bots", headers=headers, json={
                    "channel": "telegram", "bot_id": "live", "token": TOKEN,
                    "api_base": fake.url, "options": {"poll_timeout": 1}})
                assert created.status_code == 201, created.text
                await wait_for(lambda: asyncio.sleep(0, bool(fake.polls(TOKEN))), limit=15,
                               what="the other process polling the new bot")
                assert other.bot_status[("telegram", "live")] == "connected: @ExampleShopBot"
                fake.push_update(message_update(0, "/start"))
                await wait_for(lambda: other.kv.get("telegram:live:offset"),
                               what="the update handled by the other process")
                await other.drain()
                assert fake.texts(1111)[0].startswith("Вітаємо")

                deleted = await client.delete("/api/bots/telegram/live", headers=headers)
                assert deleted.status_code == 204
            await wait_for(lambda: asyncio.sleep(0, other.channel("telegram", "live") is None),
                           limit=15, what="the other process dropping the bot")
            assert ("telegram", "live") not in other.registry.runners
            polls = len(fake.polls(TOKEN))
            await asyncio.sleep(0.5)  # several refresh rounds: nothing polls it again
            assert len(fake.polls(TOKEN)) == polls
        finally:
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)


async def test_a_bot_registered_elsewhere_gets_its_webhook_here(make_platform, db_url) -> None:
    """With a public URL, the other process registers the new bot's webhook, answers its
    updates, and refuses them (404) once the bot is removed."""
    async with FakeTelegramServer() as fake:
        api = await make_platform(database_url=db_url)  # no public URL: registers nothing
        other = await make_platform(database_url=db_url, public_url="https://bots.example.com")
        registry = other.registry
        registry.BOTS_REFRESH_SECONDS, registry.RETRY_FIRST, registry.RETRY_MAX = 0.1, 0.05, 0.2
        serving = asyncio.create_task(other.serve_bots(receive=True))
        _, key = await create_key(api.db, name="a", role="admin", now=api.clock.now())
        headers = {"Authorization": f"Bearer {key}"}
        hook = {"X-Telegram-Bot-Api-Secret-Token": "hook-secret",
                "Content-Type": "application/json"}
        try:
            async with api.http_client() as client:
                created = await client.post("/api/bots", headers=headers, json={
                    "channel": "telegram", "bot_id": "hooked", "token": TOKEN,
                    "secret": "hook-secret", "api_base": fake.url})
                assert created.status_code == 201, created.text
                assert created.json()["webhook"] is None  # the API process has no URL
            await wait_for(lambda: asyncio.sleep(0, fake.webhook is not None), limit=15,
                           what="the other process registering the webhook")
            assert fake.webhook["url"] == "https://bots.example.com/webhooks/telegram/hooked"
            assert fake.webhook["secret_token"] == "hook-secret"
            assert not fake.polls(TOKEN)
            async with other.http_client() as client:
                answered = await client.post("/webhooks/telegram/hooked", headers=hook,
                                             json=message_update(1, "/start"))
                assert answered.status_code == 200
                await other.drain()
                assert fake.texts(1111)[0].startswith("Вітаємо")
                async with api.http_client() as admin:
                    deleted = await admin.delete("/api/bots/telegram/hooked", headers=headers)
                    assert deleted.status_code == 204
                await wait_for(lambda: asyncio.sleep(
                    0, other.channel("telegram", "hooked") is None), limit=15,
                    what="the other process dropping the bot")
                refused = await client.post("/webhooks/telegram/hooked", headers=hook,
                                            json=message_update(2, "hi"))
                assert refused.status_code == 404
        finally:
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)

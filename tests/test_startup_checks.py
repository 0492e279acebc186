"""Every bot is checked at start and logged as connected or failed (naming the bot, never
its token); network errors and refused tokens are retried with backoff; a poller that dies
or cannot reach Telegram comes back by itself (issue 14, item 6)."""

from __future__ import annotations

import asyncio
import logging
import socket

from bot_platform.config import BotConfig
from tests.fakes.graph_api import FakeGraphServer
from tests.fakes.telegram_api import FakeTelegramServer
from tests.fakes.viber_api import FakeViberServer
from tests.support.platform import wait_for
from tests.support.telegram import message_update

GOOD = "123456:good-telegram-token"
BAD = "654321:revoked-telegram-token"
FAST = {"poll_timeout": 1, "retry_max_delay": 0.1}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def messages(caplog, level: int = logging.DEBUG) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= level]


async def serving(platform, *, receive: bool = True) -> asyncio.Task[None]:
    platform.registry.RETRY_FIRST, platform.registry.RETRY_MAX = 0.05, 0.2
    return asyncio.create_task(platform.serve_bots(receive=receive))


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_every_bot_is_checked_and_logged_connected_or_failed(make_platform,
                                                                  caplog) -> None:
    async with FakeTelegramServer() as telegram, FakeViberServer("viber-token") as viber, \
            FakeGraphServer() as graph:
        telegram.revoke(BAD)
        graph.invalid_tokens.add("expired-page-token")
        bots = [
            BotConfig(id="shop", channel="telegram", token=GOOD, api_base=telegram.url),
            BotConfig(id="old", channel="telegram", token=BAD, api_base=telegram.url),
            BotConfig(id="vb", channel="viber", token="viber-token", api_base=viber.url),
            BotConfig(id="vbad", channel="viber", token="wrong-viber-token",
                      api_base=viber.url),
            BotConfig(id="page", channel="facebook", token="page-token",
                      secret="app-secret", api_base=graph.url),
            BotConfig(id="gone", channel="facebook", token="expired-page-token",
                      secret="app-secret", api_base=graph.url),
        ]
        platform = await make_platform(bots=bots)
        with caplog.at_level(logging.INFO):
            task = await serving(platform, receive=False)  # a worker: checks only
            await wait_for(lambda: asyncio.sleep(0, len(platform.bot_status) == 6),
                           what="every bot checked")
            # the failed ones are tried again (and logged again)
            await wait_for(lambda: asyncio.sleep(0, sum(
                "failed: telegram bot old" in m for m in messages(caplog)) >= 2),
                what="a second try")
            await stop(task)
    logged = messages(caplog)
    assert "connected: @ExampleShopBot (telegram, bot id shop)" in logged
    assert any(m.startswith("connected: Example Shop") and m.endswith("(viber, bot id vb)")
               for m in logged)
    assert any(m.startswith("connected: Example Shop (page 1067280970047460)")
               and m.endswith("(facebook, bot id page)") for m in logged)
    errors = messages(caplog, logging.ERROR)
    for bot in ("telegram bot old", "viber bot vbad", "facebook bot gone"):
        assert any(m.startswith(f"failed: {bot}:") and "refused" in m for m in errors), bot
    everything = "\n".join(logged + list(platform.bot_status.values()))
    for secret in (BAD, BAD.partition(":")[2], "wrong-viber-token", "expired-page-token"):
        assert secret not in everything
    assert telegram.of("getMe") and any(c.method == "get_account_info" for c in viber.calls)
    assert any(c.path.endswith("/me") for c in graph.calls)
    assert not telegram.polls()  # a worker does not poll


async def test_an_unreachable_api_is_retried_until_it_comes_up(make_platform, caplog) -> None:
    port = free_port()  # nothing listens there yet: connection refused
    bot = BotConfig(id="shop", channel="telegram", token=GOOD,
                    api_base=f"http://127.0.0.1:{port}", options=FAST)
    platform = await make_platform(bots=[bot])
    with caplog.at_level(logging.INFO):
        task = await serving(platform)
        await wait_for(lambda: asyncio.sleep(0, sum(
            m.startswith("failed: telegram bot shop: start-up check failed")
            for m in messages(caplog, logging.WARNING)) >= 2), what="retries logged")
        fake = await FakeTelegramServer().start(port)
        try:
            fake.push_update(message_update(0, "/start"))
            await wait_for(lambda: platform.kv.get("telegram:shop:offset"),
                           what="the update handled")
            await platform.drain()
        finally:
            await stop(task)
            await fake.close()
    assert "connected: @ExampleShopBot (telegram, bot id shop)" in messages(caplog)
    assert fake.of("deleteWebhook") and fake.polls(GOOD)
    assert fake.texts(1111)[0].startswith("Вітаємо")


async def test_the_poller_survives_connection_refused_at_delete_webhook(make_platform,
                                                                      caplog) -> None:
    port = free_port()
    bot = BotConfig(id="shop", channel="telegram", token=GOOD,
                    api_base=f"http://127.0.0.1:{port}", options=FAST)
    platform = await make_platform(bots=[bot])
    channel = platform.channel("telegram", "shop")
    with caplog.at_level(logging.INFO):
        task = asyncio.create_task(channel.poll(platform.engine.handle))
        await wait_for(lambda: asyncio.sleep(0, sum(
            "deleteWebhook failed" in m for m in messages(caplog, logging.WARNING)) >= 2),
            what="deleteWebhook retried")
        assert not task.done()
        fake = await FakeTelegramServer().start(port)
        try:
            await wait_for(lambda: asyncio.sleep(0, bool(fake.polls(GOOD))), what="polling")
        finally:
            await stop(task)
            await fake.close()
    assert fake.of("deleteWebhook")


async def test_a_refused_token_is_logged_and_polling_resumes_once_fixed(make_platform,
                                                                        caplog) -> None:
    async with FakeTelegramServer() as fake:
        bot = BotConfig(id="shop", channel="telegram", token=GOOD, api_base=fake.url,
                        options=FAST)
        platform = await make_platform(bots=[bot])
        with caplog.at_level(logging.INFO):
            task = await serving(platform)
            await wait_for(lambda: asyncio.sleep(0, bool(fake.polls(GOOD))), what="polling")
            fake.revoke(GOOD)  # revoked at @BotFather while polling
            await wait_for(lambda: asyncio.sleep(0, sum(
                "the token was refused" in m for m in messages(caplog, logging.ERROR)) >= 2),
                what="401 logged on every try")
            assert not task.done()
            fake.restore(GOOD)
            fake.push_update(message_update(0, "/start"))
            await wait_for(lambda: platform.kv.get("telegram:shop:offset"),
                           what="the update handled")
            await platform.drain()
            await stop(task)
    assert fake.texts(1111)[0].startswith("Вітаємо")
    assert all(GOOD.partition(":")[2] not in m for m in messages(caplog)
               if "aiohttp.access" not in m)


async def test_a_poller_that_dies_is_restarted(make_platform, caplog) -> None:
    async with FakeTelegramServer() as fake:
        bot = BotConfig(id="shop", channel="telegram", token=GOOD, api_base=fake.url,
                        options=FAST)
        platform = await make_platform(bots=[bot])
        handle, failures = platform.engine.handle, []

        async def flaky(event):  # the first update crashes the poller
            if not failures:
                failures.append(event)
                raise RuntimeError("engine hiccup")
            return await handle(event)

        platform.engine.handle = flaky
        fake.push_update(message_update(0, "/start"))
        with caplog.at_level(logging.INFO):
            task = await serving(platform)
            await wait_for(lambda: platform.kv.get("telegram:shop:offset"),
                           what="the update handled after the restart")
            await platform.drain()
            await stop(task)
    assert failures
    assert any(m.startswith("the poller of telegram bot shop died (RuntimeError: engine "
                            "hiccup); restarting it") for m in messages(caplog, logging.ERROR))
    assert fake.texts(1111)[0].startswith("Вітаємо")

"""The web inbox in a real headless browser (Debian's chromium driven by Selenium): a new
escalation appears without a reload, the agent claims it, replies (the reply reaches the
Telegram fake) and resolves. Skips without chromium; mandatory in CI."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
from typing import Any

import pytest

from bot_platform.apikeys import create_key
from bot_platform.config import BotConfig
from tests.fakes.telegram_api import FakeTelegramServer
from tests.support.services import service_missing
from tests.support.telegram import SECRET, TOKEN, message_update

pytestmark = pytest.mark.slow


def _browser() -> Any:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        service_missing("chromium", "install Debian's chromium and chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # console, CSP reports
    return webdriver.Chrome(service=Service(driver), options=options)


async def test_inbox_shows_escalations_live_replies_and_resolves(make_platform) -> None:
    import httpx
    import uvicorn
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser = await asyncio.to_thread(_browser)
    async with FakeTelegramServer() as fake:
        platform = await make_platform(bots=[BotConfig(
            id="shop", channel="telegram", token=TOKEN, secret=SECRET, api_base=fake.url)])
        _, key = await create_key(platform.db, name="ann", role="agent",
                                  now=platform.clock.now())
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(platform.app(), host="127.0.0.1", port=port,
                                               log_level="warning", lifespan="off"))
        serving = asyncio.create_task(server.serve())
        worker_stop = asyncio.Event()
        working = asyncio.create_task(platform.worker.run(worker_stop))
        base = f"http://127.0.0.1:{port}"
        try:
            for _ in range(250):
                if server.started:
                    break
                await asyncio.sleep(0.02)

            def connect() -> None:
                browser.get(f"{base}/inbox")
                browser.find_element(By.ID, "key").send_keys(key)
                browser.find_element(By.ID, "connect").click()
                WebDriverWait(browser, 20).until(
                    ec.text_to_be_present_in_element((By.ID, "status"), "connected as ann"))

            await asyncio.to_thread(connect)
            async with httpx.AsyncClient(base_url=base) as client:
                await client.post("/webhooks/telegram/shop",
                                  content=json.dumps(message_update(1, "оператор")),
                                  headers={"X-Telegram-Bot-Api-Secret-Token": SECRET,
                                           "Content-Type": "application/json"})

            def claim_and_reply() -> None:
                wait = WebDriverWait(browser, 20)
                claim = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR,
                                                               "#queue li .claim")))
                assert "asked_for_human" in browser.find_element(By.ID, "queue").text
                claim.click()
                wait.until(ec.text_to_be_present_in_element((By.ID, "history"), "оператор"))
                browser.find_element(By.ID, "reply").send_keys("Hello, this is Ann!")
                browser.find_element(By.ID, "send").click()
                wait.until(ec.text_to_be_present_in_element((By.ID, "history"),
                                                            "Hello, this is Ann!"))

            await asyncio.to_thread(claim_and_reply)
            for _ in range(100):
                if "Hello, this is Ann!" in fake.texts(1111):
                    break
                await asyncio.sleep(0.1)
            assert "Hello, this is Ann!" in fake.texts(1111)

            def resolve() -> None:
                browser.find_element(By.ID, "resolve").click()
                WebDriverWait(browser, 20).until(
                    ec.text_to_be_present_in_element((By.ID, "title"), "Resolved"))

            await asyncio.to_thread(resolve)
            from sqlalchemy import select

            from bot_platform.models import Conversation

            async with platform.db.session() as session:
                assert await session.scalar(select(Conversation.status)) == "resolved"
        finally:
            await asyncio.to_thread(browser.quit)
            worker_stop.set()
            await working
            server.should_exit = True
            await serving


class CuttableProxy:
    """A TCP relay in front of the server whose connections can be cut (a network error:
    the browser's stream read fails, new connections are refused) and restored."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _relay(self, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers += [writer, up_writer]

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.transport.abort()
        self.writers.clear()


async def test_inbox_reconnects_after_a_network_error(make_platform) -> None:
    import httpx
    import uvicorn
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    import admin_api.conversations as conversations

    browser = await asyncio.to_thread(_browser)
    async with FakeTelegramServer() as fake:
        platform = await make_platform(bots=[BotConfig(
            id="shop", channel="telegram", token=TOKEN, secret=SECRET, api_base=fake.url)])
        _, key = await create_key(platform.db, name="ann", role="agent",
                                  now=platform.clock.now())
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(platform.app(), host="127.0.0.1", port=port,
                                               log_level="warning", lifespan="off"))
        serving = asyncio.create_task(server.serve())
        proxy = CuttableProxy(port)
        old_poll, conversations.LIVE_POLL_SECONDS = conversations.LIVE_POLL_SECONDS, 0.1
        try:
            for _ in range(250):
                if server.started:
                    break
                await asyncio.sleep(0.02)
            await proxy.start()

            def connect() -> None:
                browser.get(f"http://127.0.0.1:{proxy.port}/inbox")
                browser.find_element(By.ID, "key").send_keys(key)
                browser.find_element(By.ID, "connect").click()
                WebDriverWait(browser, 20).until(
                    ec.text_to_be_present_in_element((By.ID, "status"), "connected as ann"))

            await asyncio.to_thread(connect)
            await proxy.cut()  # the stream breaks mid-read; reconnects are refused
            await asyncio.to_thread(WebDriverWait(browser, 20).until,
                                    ec.text_to_be_present_in_element((By.ID, "status"),
                                                                     "reconnecting"))
            await asyncio.sleep(1.5)
            await proxy.start()  # the network is back, same address
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                await client.post("/webhooks/telegram/shop",
                                  content=json.dumps(message_update(1, "оператор")),
                                  headers={"X-Telegram-Bot-Api-Secret-Token": SECRET,
                                           "Content-Type": "application/json"})

            def sees_the_new_chat() -> None:
                wait = WebDriverWait(browser, 40)
                wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "#queue li .claim")))
                wait.until(ec.text_to_be_present_in_element((By.ID, "status"),
                                                            "connected as ann"))

            await asyncio.to_thread(sees_the_new_chat)
        finally:
            conversations.LIVE_POLL_SECONDS = old_poll
            await asyncio.to_thread(browser.quit)
            await proxy.cut()
            server.should_exit = True
            platform.stopping.set()
            await serving


async def test_api_docs_render_offline_from_local_assets(make_platform) -> None:
    """/docs (Swagger UI) and /redoc show the operations with no other origin reachable
    (no internet here): every script and style comes from this server, and the pages' own
    policy refuses nothing they need."""
    import uvicorn
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = await asyncio.to_thread(_browser)
    platform = await make_platform()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(platform.app(), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="off"))
    serving = asyncio.create_task(server.serve())
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(250):
            if server.started:
                break
            await asyncio.sleep(0.02)

        def swagger() -> list[str]:
            browser.get(f"{base}/docs")
            WebDriverWait(browser, 30).until(
                lambda b: b.find_elements(By.CSS_SELECTOR, ".opblock .opblock-summary-path"))
            return [e.get_attribute("data-path") or e.text for e in browser.find_elements(
                By.CSS_SELECTOR, ".opblock .opblock-summary-path")]

        def redoc() -> str:
            browser.get(f"{base}/redoc")
            WebDriverWait(browser, 30).until(
                lambda b: "Prometheus metrics" in b.find_element(By.TAG_NAME, "body").text)
            return browser.find_element(By.TAG_NAME, "body").text

        def requested() -> list[str]:
            return browser.execute_script(
                "return performance.getEntriesByType('resource').map(e => e.name)")

        def console() -> list[str]:
            return [entry["message"] for entry in browser.get_log("browser")]

        paths = await asyncio.to_thread(swagger)
        assert "/healthz" in paths and "/metrics" in paths
        assert all(url.startswith(base) for url in await asyncio.to_thread(requested))
        assert await asyncio.to_thread(console) == []  # no CSP refusal, no error
        assert "Count a click and redirect" in await asyncio.to_thread(redoc)
        # ReDoc's bundle hard-wires one image from its vendor's CDN (a sidebar credit,
        # hidden when it fails): the page's policy refuses it, nothing else leaves.
        credit = "https://cdn.redoc.ly/redoc/logo-mini.svg"
        assert {url for url in await asyncio.to_thread(requested)
                if not url.startswith(base)} <= {credit}
        refusals = await asyncio.to_thread(console)
        assert all(credit in line and "Content Security Policy" in line
                   for line in refusals), refusals
    finally:
        await asyncio.to_thread(browser.quit)
        server.should_exit = True
        await serving

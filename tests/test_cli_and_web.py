"""The newcomer's path: ``botp chat`` in a terminal, and the web edge (health, webhooks,
bad input)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import func, select

from bot_platform.models import ProcessedEvent, Subscriber
from tests.support.platform import ROOT

CONSOLE_SECRET = "console-secret-for-tests"
CONSOLE_AUTH = {"X-Botp-Console-Secret": CONSOLE_SECRET}


def run_chat(tmp_path: Path, script: str, *args: str) -> str:
    env = {**os.environ, "BOTP_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/chat.sqlite3"}
    result = subprocess.run(
        [sys.executable, "-m", "bot_platform.cli", "chat", *args], input=script,
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.slow
def test_chat_start_press_a_button_and_wait_a_day(tmp_path: Path) -> None:
    out = run_chat(tmp_path, "/start\n1\n/wait 1d\n/quit\n", "--name", "Alex")
    greeting = out.index("bot> Hi Alex! Welcome to Example Shop.")
    assert "[1] Show me a tip" in out[greeting:]
    assert "[3] Open the shop -> https://shop.example.com/" in out[greeting:]
    tip_now = out.index("bot> Tip: a gentle cleanser")
    waited = out.index("... 1 day, 0:00:00 later")
    tip = out.index("bot> Tip of the day")
    assert greeting < tip_now < waited < tip

    # The same database on the next run: the conversation goes on where it was.
    out = run_chat(tmp_path, "/wait 2d\n/quit\n")
    assert "bot> Here is your gift: 10% off your first order with the code WELCOME10." in out


@pytest.mark.slow
def test_chat_speaks_the_users_language(tmp_path: Path) -> None:
    out = run_chat(tmp_path, "/start\n", "--language", "ar", "--name", "Layla")
    assert "bot> مرحبًا Layla! أهلًا بك في Example Shop." in out


async def test_health_and_console_webhook(make_platform) -> None:
    platform = await make_platform(console_secret=CONSOLE_SECRET)
    async with platform.http_client() as client:
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        body = {"user_id": "w1", "text": "/start", "event_id": "evt-1", "first_name": "Kim"}
        first = await client.post("/webhooks/console/console", json=body,
                                  headers=CONSOLE_AUTH)
        again = await client.post("/webhooks/console/console", json=body,
                                  headers=CONSOLE_AUTH)
    assert (first.status_code, again.status_code) == (200, 200)
    await platform.drain()
    sent = platform.channel("console", "console").sent
    assert [(user, m.text[:7]) for user, m in sent] == [("w1", "Hi Kim!")]


async def test_malformed_body_gets_400_and_a_log_line_and_stores_nothing(
        make_platform, caplog: pytest.LogCaptureFixture) -> None:
    platform = await make_platform(console_secret=CONSOLE_SECRET)
    with caplog.at_level(logging.WARNING, logger="bot_platform.app"):
        async with platform.http_client() as client:
            response = await client.post("/webhooks/console/console", content=b"{not json",
                                         headers=CONSOLE_AUTH)
    assert response.status_code == 400
    assert any("malformed webhook for console/console" in r.message for r in caplog.records)
    async with platform.db.session() as session:
        assert await session.scalar(select(func.count()).select_from(Subscriber)) == 0
        assert await session.scalar(select(func.count()).select_from(ProcessedEvent)) == 0


async def test_unknown_bot_gets_404(make_platform) -> None:
    platform = await make_platform()
    async with platform.http_client() as client:
        response = await client.post("/webhooks/telegram/nope", content=json.dumps({}))
    assert response.status_code == 404


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_run_refuses_invalid_flows_and_says_which(tmp_path: Path) -> None:
    flows = tmp_path / "flows"
    flows.mkdir()
    (flows / "bad.yaml").write_text("flow: bad\nstart: nowhere\nstates: {a: {say: x}}\n")
    env = {**os.environ, "BOTP_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/r.sqlite3",
           "BOTP_FLOWS_DIR": str(flows), "BOTP_PORT": str(_free_port())}
    result = subprocess.run([sys.executable, "-m", "bot_platform.cli", "run"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert "bad.yaml: start: unknown state 'nowhere'" in result.stderr
    assert "--skip-invalid-flows" in result.stderr


@pytest.mark.slow
async def test_run_serves_webhooks_and_delivers(tmp_path: Path) -> None:
    import asyncio

    import httpx

    from tests.fakes.relay import FakeRelayServer

    flows = tmp_path / "flows"
    flows.mkdir()
    for name in ("welcome.yaml", "spring_promo.yaml"):
        (flows / name).write_text((ROOT / "flows" / name).read_text())
    (flows / "bad.yaml").write_text("flow: bad\nstart: nowhere\nstates: {a: {say: x}}\n")
    port = _free_port()
    async with FakeRelayServer() as relay:
        bots = [{"id": "console", "channel": "console", "api_base": relay.url,
                 "secret": CONSOLE_SECRET}]
        env = {**os.environ, "BOTP_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/r.sqlite3",
               "BOTP_FLOWS_DIR": str(flows), "BOTP_PORT": str(port),
               "BOTP_BOTS": json.dumps(bots)}
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot_platform.cli", "run", "--skip-invalid-flows",
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                for _ in range(200):
                    try:
                        if (await client.get("/healthz")).status_code == 200:
                            break
                    except httpx.TransportError:
                        await asyncio.sleep(0.1)
                response = await client.post("/webhooks/console/console", json={
                    "user_id": "r1", "text": "/start promo-spring", "first_name": "Ann"},
                    headers=CONSOLE_AUTH)
                assert response.status_code == 200
                for _ in range(200):
                    if relay.received:
                        break
                    await asyncio.sleep(0.05)
            assert relay.texts("r1") == [
                "Spring is here, Ann! Would you like a code for the spring collection?"]
        finally:
            process.terminate()
            _, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 0
    assert b"skipped invalid flow file" in stderr and b"bad.yaml" in stderr


class AnsweringChannel:
    """A channel that answers the webhook with the first queued reply (like Viber's
    conversation_started) and sends the rest through the worker."""

    name = "answering"
    bot_id = "b1"

    def __init__(self) -> None:
        import math

        from bot_platform.types import Capabilities

        self.capabilities = Capabilities(messages_per_second=math.inf,
                                         per_chat_per_second=math.inf, max_text_length=30)
        self.sent: list[str] = []

    async def parse(self, request):
        from bot_platform.types import Inbound, InboundKind

        body = json.loads(request.body)
        return [Inbound(channel="answering", bot_id="b1", user_id=body["user"],
                        event_id=body["id"], kind=InboundKind.START)]

    async def reply(self, request, handled):
        from bot_platform.channels import WebhookReply

        event = handled[0]
        if event.duplicate or not event.replies:
            return None
        return WebhookReply(body=event.replies[0].text.encode(),
                            consumed_outbox_ids=(event.outbox_ids[0],))

    async def send(self, recipient, message):
        from bot_platform.types import SendResult

        self.sent.append(message.text)
        return SendResult.sent(str(len(self.sent)))


async def test_an_adapter_can_answer_in_the_webhook_response(make_platform) -> None:
    from bot_platform.config import BotConfig
    from bot_platform.models import Outbox

    channel = AnsweringChannel()
    platform = await make_platform(bots=[BotConfig(id="b1", channel="answering")],
                                   channel_overrides={("answering", "b1"): channel})
    async with platform.http_client() as client:
        response = await client.post("/webhooks/answering/b1",
                                     json={"user": "v1", "id": "e1"})
    assert response.status_code == 200
    first = response.text
    await platform.drain()
    # The greeting was split in parts of 30 characters: the first travelled in the
    # response, the worker sent the rest, nothing twice.
    assert first and first not in channel.sent
    assert len(channel.sent) >= 2
    async with platform.db.session() as session:
        statuses = (await session.scalars(select(Outbox.status).order_by(Outbox.id))).all()
    assert set(statuses) == {"sent"} and len(statuses) == len(channel.sent) + 1

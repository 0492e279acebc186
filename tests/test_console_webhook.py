"""The console channel is for ``botp chat`` on this machine: over HTTP its webhook does
not exist unless a console secret is configured, and then it needs that secret."""

from __future__ import annotations

import builtins
from collections.abc import Iterator

import pytest
from sqlalchemy import func, select

from bot_platform import cli
from bot_platform.config import BotConfig, Settings
from bot_platform.models import Message, Outbox, ProcessedEvent, Subscriber
from tests.support.platform import ROOT

SECRET = "console-webhook-secret-0123456789"
WEBHOOK = "/webhooks/console/console"
START = {"user_id": "anon", "text": "/start", "first_name": "Eve"}


async def stored(platform) -> dict[str, int]:
    async with platform.db.session() as session:
        return {model.__tablename__: await session.scalar(
            select(func.count()).select_from(model))
            for model in (Subscriber, ProcessedEvent, Message, Outbox)}


NOTHING = {"subscribers": 0, "processed_events": 0, "messages": 0, "outbox": 0}


async def test_without_a_secret_the_console_webhook_does_not_exist(make_platform,
                                                                   db_url) -> None:
    platform = await make_platform(database_url=db_url)
    async with platform.http_client() as client:
        anonymous = await client.post(WEBHOOK, json=START)
        guessed = await client.post(WEBHOOK, json=START,
                                    headers={"X-Botp-Console-Secret": ""})
        read = await client.get(WEBHOOK)
    assert [r.status_code for r in (anonymous, guessed, read)] == [404, 404, 404]
    await platform.drain()
    assert await stored(platform) == NOTHING
    assert platform.channel("console", "console").sent == []


@pytest.mark.parametrize("how", ["setting", "bot config"])
async def test_with_a_secret_only_callers_that_send_it_get_in(make_platform, db_url,
                                                              how: str) -> None:
    if how == "setting":
        platform = await make_platform(database_url=db_url, console_secret=SECRET)
    else:
        platform = await make_platform(database_url=db_url, bots=[
            BotConfig(id="console", channel="console", secret=SECRET)])
    async with platform.http_client() as client:
        refused = [
            await client.post(WEBHOOK, json=START),
            await client.post(WEBHOOK, json=START, headers={"X-Botp-Console-Secret": "x"}),
            await client.post(WEBHOOK, json=START,
                              headers={"X-Botp-Console-Secret": SECRET[:-1]}),
        ]
        assert [r.status_code for r in refused] == [401, 401, 401]
        await platform.drain()
        assert await stored(platform) == NOTHING

        accepted = await client.post(WEBHOOK, json={**START, "user_id": "smoke"},
                                     headers={"X-Botp-Console-Secret": SECRET})
    assert accepted.status_code == 200, accepted.text
    await platform.drain()
    counts = await stored(platform)
    assert counts["subscribers"] == 1 and counts["outbox"] >= 1
    sent = platform.channel("console", "console").sent
    assert sent and {user for user, _ in sent} == {"smoke"}
    assert sent[0][1].text.startswith("Hi Eve!")


def test_the_console_secret_comes_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("BOTP_CONSOLE_SECRET", SECRET)
    [console] = [b for b in Settings(_env_file=None).all_bots() if b.channel == "console"]
    assert console.secret is not None and console.secret.get_secret_value() == SECRET
    monkeypatch.delenv("BOTP_CONSOLE_SECRET")
    [console] = [b for b in Settings(_env_file=None).all_bots() if b.channel == "console"]
    assert console.secret is None


@pytest.fixture
def typed(monkeypatch) -> Iterator[list[str]]:
    """Lines for ``input()``; end of input after the last."""
    lines: list[str] = []

    def fake_input(prompt: str = "") -> str:
        if not lines:
            raise EOFError
        return lines.pop(0)

    monkeypatch.setattr(builtins, "input", fake_input)
    yield lines


def test_botp_chat_talks_to_the_engine_in_process_without_any_secret(
        tmp_path, monkeypatch, typed, capsys) -> None:
    """``botp chat`` never goes through the webhook, so it needs no secret (and runs next
    to a ``botp run`` on the same database, which keeps the webhook closed)."""
    monkeypatch.delenv("BOTP_CONSOLE_SECRET", raising=False)
    monkeypatch.chdir(ROOT)
    cli.get_settings.cache_clear()
    typed.extend(["/start", "/quit"])
    try:
        code = cli.main(["chat", "--name", "Alex", "--database-url",
                         f"sqlite+aiosqlite:///{tmp_path}/chat.sqlite3"])
    finally:
        cli.get_settings.cache_clear()
    assert code == 0
    assert "bot> Hi Alex! Welcome to Example Shop." in capsys.readouterr().out

"""Shop events: validated, stored once, routed to the right subscriber's flows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from pydantic import ValidationError
from sqlalchemy import func, select

from bot_platform.events import EventIn, ingest
from bot_platform.models import CustomerEvent
from tests.support.engine import CART_FLOW, Chat
from tests.support.platform import ROOT


@pytest.fixture
async def cart_platform(make_platform, tmp_path: Path):
    flows = tmp_path / "flows"
    flows.mkdir()
    (flows / "cart.yaml").write_text(CART_FLOW)
    return await make_platform(flows_dir=flows)


def test_an_event_must_name_a_customer() -> None:
    with pytest.raises(ValidationError, match="name the customer"):
        EventIn(name="cart_updated")
    with pytest.raises(ValidationError, match="go together"):
        EventIn(name="cart_updated", channel="console")
    with pytest.raises(ValidationError, match="should match pattern"):
        EventIn(name="Cart Updated", subscriber_id=1)


async def test_events_reach_the_subscriber_by_identity_email_or_phone(cart_platform) -> None:
    chat = Chat(cart_platform)
    await chat.say("/phone +48500100200")
    engine = cart_platform.engine
    by_user = await ingest(engine, EventIn(
        name="cart_updated", channel="console", bot_id="console", user_id="u1",
        event_id="c-1", data={"items": ["serum"]}))
    assert by_user.status == "accepted"
    assert (await ingest(engine, EventIn(name="cart_updated", channel="console",
                                         bot_id="console", user_id="u1",
                                         event_id="c-1"))).status == "duplicate"
    by_phone = await ingest(engine, EventIn(name="order_placed", phone="+48500100200",
                                            event_id="o-1", data={"total": 42}))
    assert by_phone.subscriber_id == by_user.subscriber_id
    assert await chat.wait(timedelta(hours=2)) == []  # the order cancelled the reminder
    unknown = await ingest(engine, EventIn(name="order_placed", email="x@example.com"))
    assert unknown.status == "unknown_customer"
    async with cart_platform.db.session() as session:
        assert await session.scalar(select(func.count()).select_from(CustomerEvent)) == 3


async def test_email_captured_in_a_flow_identifies_the_customer(make_platform) -> None:
    platform = await make_platform()
    chat = Chat(platform)
    await chat.say("/start")
    await chat.say("2")
    await chat.say("Alex@Example.com")
    result = await ingest(platform.engine, EventIn(name="birthday", email="alex@example.com"))
    assert result.status == "accepted"


@pytest.mark.slow
def test_cli_sends_and_imports_events(tmp_path: Path) -> None:
    env = {**os.environ, "BOTP_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/e.sqlite3"}
    run = lambda *args: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "bot_platform.cli", "events", *args], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=60, check=False)
    sent = run("send", "order_placed", "--id", "o-9", "--email", "a@b.co",
               "--data", '{"total": 10}')
    assert sent.returncode == 0, sent.stderr
    assert sent.stdout.strip() == "order_placed o-9: unknown_customer"
    lines = tmp_path / "events.jsonl"
    lines.write_text("\n".join(json.dumps(e) for e in [
        {"name": "order_placed", "event_id": "o-9", "email": "a@b.co"},
        {"name": "cart_updated", "event_id": "c-1", "phone": "+1555000111"}]))
    imported = run("import", str(lines))
    assert imported.stdout.splitlines() == ["order_placed o-9: duplicate",
                                            "cart_updated c-1: unknown_customer"]
    bad = run("send", "Not A Name", "--phone", "1")
    assert bad.returncode == 2 and "invalid event" in bad.stderr

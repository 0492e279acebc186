"""Channel fallback: a message unread after X hours goes out once through the contact's
other channel; a read (or answered) message never does."""

from __future__ import annotations

import textwrap
from datetime import timedelta
from pathlib import Path

import pytest

from bot_platform.config import BotConfig
from bot_platform.types import Inbound, InboundKind, Profile
from tests.support.engine import Chat
from tests.support.scripted import ScriptedChannel

FLOW = textwrap.dedent("""
    flow: promo
    triggers: [{on: keyword, keywords: [promo]}]
    start: offer
    states:
      offer:
        say:
          - text: welcome-offer
            fallback: {after: 6h, channel: console}
        end: true
""")


@pytest.fixture
async def two_channels(make_platform, tmp_path: Path):
    flows = tmp_path / "flows"
    flows.mkdir()
    (flows / "promo.yaml").write_text(FLOW)
    viber = ScriptedChannel()
    viber.name = "scripted"
    platform = await make_platform(bots=[BotConfig(id="b1", channel="scripted")],
                                   flows_dir=flows,
                                   channel_overrides={("scripted", "b1"): viber})
    phone = Profile(phone="+380501234567", first_name="Ira")
    for channel, user in (("scripted", "v1"), ("console", "c1")):
        await platform.engine.handle(Inbound(channel=channel, bot_id="b1" if channel ==
                                             "scripted" else "console", user_id=user,
                                             event_id=f"contact-{user}",
                                             kind=InboundKind.CONTACT, profile=phone))
    await platform.drain()
    return platform, viber


async def promo(platform) -> None:
    await platform.engine.handle(Inbound(channel="scripted", bot_id="b1", user_id="v1",
                                         event_id="promo", kind=InboundKind.TEXT,
                                         text="promo"))
    await platform.drain()


async def test_unread_after_six_hours_goes_out_once_on_the_other_channel(two_channels) -> None:
    platform, viber = two_channels
    await promo(platform)
    assert [m.text[:10] for _, m, _ in viber.calls] == ["Here is yo"]
    console = Chat(platform, user="c1")
    assert await console.wait(timedelta(hours=5)) == []
    resent = await console.wait(timedelta(hours=1))
    assert [m.text[:10] for m in resent] == ["Here is yo"]
    assert await console.wait(timedelta(days=2)) == []  # once


async def test_read_message_is_not_sent_again(two_channels) -> None:
    platform, viber = two_channels
    await promo(platform)
    message_id = f"m{len(viber.calls)}"  # the id ScriptedChannel gave the last send
    await platform.engine.handle(Inbound(channel="scripted", bot_id="b1", user_id="v1",
                                         event_id="seen-1", kind=InboundKind.READ,
                                         message_ids=(message_id,)))
    console = Chat(platform, user="c1")
    assert await console.wait(timedelta(hours=7)) == []


async def test_an_answer_counts_as_read_where_there_are_no_receipts(two_channels) -> None:
    platform, _ = two_channels
    await promo(platform)
    platform.clock.advance(timedelta(hours=1))
    await platform.engine.handle(Inbound(channel="scripted", bot_id="b1", user_id="v1",
                                         event_id="reply", kind=InboundKind.TEXT,
                                         text="thanks!"))
    console = Chat(platform, user="c1")
    assert await console.wait(timedelta(hours=7)) == []

"""The channel contract (issue 15, item 5): the same scenarios over every adapter in the
channel registry, each against its fake messenger.

What a channel promises: ``send`` makes one API call per fitted part and reports faults
as results (429 -> retry_after, a person who blocked the bot -> blocked); text, buttons,
long text, pictures, carousels and quick replies reach the person as the message meant
them, degraded only as its ``Capabilities`` say; a pressed choice comes back as the
payload it carried (a quick reply that looks like a phone number is a button, not a
shared contact); a 5xx on part two delivers each part once; a webhook re-delivered is
processed once; a forged one is refused (401/403) and a malformed one is a 400, with
nothing stored. What differs per messenger lives in its harness (``tests/contract/``).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import aiohttp
import pytest
from sqlalchemy import func, select

from bot_platform.apikeys import create_key
from bot_platform.channels import (
    BUILTIN_CHANNELS,
    LOCAL_CHANNELS,
    Channel,
    ChannelDeps,
    LongPayloads,
    SupportsClose,
    WebhookRequest,
    load_channel_factory,
    messenger_channels,
)
from bot_platform.fitting import fit_message
from bot_platform.models import Message, Outbox, ProcessedEvent, Subscriber
from bot_platform.ratelimit import MemoryRateLimiter
from bot_platform.types import (
    Button,
    Capabilities,
    Card,
    Inbound,
    InboundKind,
    Outgoing,
    QuickReply,
    SendResult,
    SendStatus,
    past_window,
)
from tests.contract import HARNESSES, DictKV, Harness, load_harness

PICTURE = "https://img.example.com/spring.jpg"
SHOP = "https://shop.example.com/sale"
PHONE_LIKE = "+380501234567"
WORDS = " ".join(f"word{n:04}" for n in range(1000))  # 8,999 characters


def test_every_registered_channel_has_a_harness() -> None:
    assert set(HARNESSES) == set(BUILTIN_CHANNELS)


def test_the_admin_api_registers_every_messenger_of_the_registry() -> None:
    from admin_api.bots import BotCreate

    schema = BotCreate.model_json_schema()["properties"]["channel"]
    assert schema["enum"] == list(messenger_channels())
    assert set(messenger_channels()) == set(BUILTIN_CHANNELS) - LOCAL_CHANNELS


def test_past_the_reply_window_only_a_pass_lets_a_message_out() -> None:
    facebook = Capabilities(reply_window=timedelta(hours=24), agent_window_pass="HUMAN_AGENT")
    plain = Capabilities(reply_window=timedelta(hours=24))
    tagged = Outgoing(text="shipped", outside_window="POST_PURCHASE_UPDATE")
    agent = Outgoing(text="Ann here", by_agent=True)
    assert past_window(Outgoing(text="sale"), facebook) is None
    assert past_window(tagged, facebook) == tagged
    assert past_window(agent, facebook) == agent.model_copy(
        update={"outside_window": "HUMAN_AGENT"})
    assert past_window(agent, plain) is None  # no pass for agents on this channel
    # Rows queued before the field was renamed still load.
    assert Outgoing.model_validate({"text": "x", "tag": "ACCOUNT_UPDATE"}) == Outgoing(
        text="x", outside_window="ACCOUNT_UPDATE")


@pytest.fixture(params=list(HARNESSES))
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    harness = load_harness(request.param)
    async with harness.fake() as server:
        harness.start(server)
        yield harness


@pytest.fixture
async def channel(harness: Harness) -> AsyncIterator[Channel]:
    """The adapter as the registry builds it, on the harness's fake."""
    async with aiohttp.ClientSession() as http:
        adapter = load_channel_factory(harness.channel)(
            harness.bot(), ChannelDeps(http=http, kv=DictKV()))
        yield adapter
        if isinstance(adapter, SupportsClose):
            await adapter.close()


async def send(harness: Harness, channel: Channel, message: Outgoing) -> list[SendResult]:
    """Fit the message and send each part: exactly one call per part."""
    results = []
    for part in fit_message(message, channel.capabilities):
        before = harness.sends()
        results.append(await channel.send(harness.user, part))
        assert harness.sends() == before + 1, part
    return results


async def parse(channel: Channel, webhook: tuple[bytes, dict[str, str]]) -> list[Inbound]:
    body, headers = webhook
    return await channel.parse(WebhookRequest(
        "POST", {k.lower(): v for k, v in headers.items()}, {}, body))


async def test_long_payloads_travel_as_tokens_and_come_back_whole() -> None:
    payloads = LongPayloads(DictKV(), "viber", 20)
    short = Outgoing(text="x", buttons=(Button(title="a", payload="short"),))
    assert await payloads.shortened(short) is short  # nothing to shorten: no copy
    long, lookalike = "p" * 30, "~not-a-token"  # the second could pass for a token
    message = Outgoing(text="x", buttons=(Button(title="a", payload=long),),
                       quick_replies=(QuickReply(title="q", payload=lookalike),),
                       cards=(Card(title="c", buttons=(Button(title="b", payload=long),)),))
    sent = await payloads.shortened(message)
    tokens = [sent.buttons[0].payload, sent.quick_replies[0].payload,
              sent.cards[0].buttons[0].payload]
    assert all(t and len(t.encode()) <= 20 for t in tokens)
    assert [await payloads.restore(t or "") for t in tokens] == [long, lookalike, long]
    assert await payloads.restore("~unknown") == "~unknown"


# ---- what the person sees ---------------------------------------------------------------


async def test_text_arrives_as_written(harness, channel) -> None:
    text = "Hello <b>Tom & Jerry</b> 😀"
    [result] = await send(harness, channel, Outgoing(text=text))
    assert result.status == SendStatus.SENT and result.message_id
    assert [d.text for d in harness.delivered()] == [text]


async def test_buttons_show_and_come_back_as_their_payloads(harness, channel) -> None:
    # Longer than the messenger carries back (Telegram: 64 bytes of callback data).
    long_payload = "f:" + "x" * (channel.capabilities.callback_payload_bytes or 100)
    buttons = (Button(title="Yes", payload="yes"), Button(title="Tell me more",
               payload=long_payload), Button(title="Shop", url=SHOP))
    results = await send(harness, channel, Outgoing(text="Interested?", buttons=buttons))
    assert {r.status for r in results} == {SendStatus.SENT}
    [message] = [d for d in harness.delivered() if d.choices]
    assert message.text == "Interested?"
    assert list(message.choices) == ["Yes", "Tell me more", "Shop"]
    for number, (index, payload) in enumerate([(0, "yes"), (1, long_payload)], start=1):
        [event] = await parse(channel, harness.press(number, message, index))
        assert (event.kind, event.payload) == (InboundKind.BUTTON, payload)


async def test_long_text_arrives_whole_in_parts_within_the_limit(harness, channel) -> None:
    caps = channel.capabilities
    results = await send(harness, channel, Outgoing(text=WORDS))
    delivered = harness.delivered()
    assert len(results) == len(delivered) >= 2
    assert " ".join(d.text for d in delivered).split() == WORDS.split()
    assert all(len(d.text) <= caps.max_text_length for d in delivered)


async def test_a_picture_arrives_once_with_its_text(harness, channel) -> None:
    await send(harness, channel, Outgoing(text="Spring sale", image_url=PICTURE))
    delivered = harness.delivered()
    assert [d.image for d in delivered if d.image] == [PICTURE]
    assert [d.text for d in delivered if d.text] == ["Spring sale"]
    # A caption rides with the picture where the channel has captions (one call).
    caption = channel.capabilities.max_caption
    assert len(delivered) == (2 if caption == 0 else 1)


async def test_a_carousel_shows_every_card_once_in_order(harness, channel) -> None:
    cards = tuple(Card(title=f"Cream {n}", subtitle="29 EUR", image_url=PICTURE,
                       buttons=(Button(title="View", url=SHOP),)) for n in range(3))
    await send(harness, channel, Outgoing(cards=cards))
    delivered = harness.delivered()
    titles = [c.title for c in cards]
    if channel.capabilities.carousels:  # one native carousel
        assert [d.cards for d in delivered] == [tuple(titles)]
    else:  # degraded: a picture card per card, its title first in the caption
        assert [d.text.split("\n")[0] for d in delivered] == titles
        assert [d.image for d in delivered] == [PICTURE] * 3


async def test_a_quick_reply_that_looks_like_a_phone_number_stays_a_reply(
        harness, channel) -> None:
    """Only a shared contact is a phone number: a quick reply whose payload (or title)
    is "+380501234567" or digits comes back as what was pressed."""
    replies = (QuickReply(title=PHONE_LIKE, payload=PHONE_LIKE),
               QuickReply(title="9", payload="9"),
               QuickReply(title="Share my phone", request="phone"))
    await send(harness, channel, Outgoing(text="How can we reach you?", quick_replies=replies))
    [message] = harness.delivered()
    assert {PHONE_LIKE, "9"} <= set(message.choices)
    for number, value in enumerate((PHONE_LIKE, "9"), start=1):
        [event] = await parse(channel, harness.press(number, message,
                                                     message.choices.index(value)))
        assert event.kind in (InboundKind.BUTTON, InboundKind.TEXT)
        assert event.profile.phone is None
        assert (event.payload if event.kind == InboundKind.BUTTON else event.text) == value


# ---- faults -----------------------------------------------------------------------------


async def test_a_429_is_a_retry_after(harness, channel) -> None:
    harness.fail(harness.sends() + 1, "429")
    [result] = await send(harness, channel, Outgoing(text="hi"))
    assert result.status == SendStatus.RETRY_AFTER and (result.retry_after or 0) > 0
    assert harness.delivered() == []


async def test_a_person_who_blocked_the_bot_is_blocked(harness, channel) -> None:
    harness.block()
    [result] = await send(harness, channel, Outgoing(text="hi"))
    assert result.status == SendStatus.BLOCKED
    assert harness.delivered() == []


# ---- through the platform: delivery and the webhook edge ---------------------------------


@pytest.fixture
async def platform(harness: Harness, make_platform: Any) -> Any:
    fake_time = [1000.0]  # the rate limiter's clock: a pause ends when the test says
    platform = await make_platform(bots=[harness.bot()], limiter=MemoryRateLimiter(
        monotonic=lambda: fake_time[0]))
    platform.fake_time = fake_time
    harness.attach(platform)
    return platform


async def post(platform: Any, harness: Harness, path_body: tuple[bytes, dict[str, str]],
               ) -> int:
    body, headers = path_body
    async with platform.http_client() as client:
        response = await client.post(f"/webhooks/{harness.channel}/{harness.bot_id}",
                                     content=body, headers=headers)
    return response.status_code


async def counts(platform: Any) -> dict[str, int]:
    async with platform.db.session() as session:
        return {
            "subscribers": await session.scalar(select(func.count()).select_from(Subscriber)),
            "events": await session.scalar(select(func.count()).select_from(ProcessedEvent)),
            "inbound": await session.scalar(select(func.count()).select_from(Message).where(
                Message.direction == "in")),
        }


async def test_a_5xx_on_part_two_delivers_each_part_once(harness, platform) -> None:
    assert await post(platform, harness, harness.webhook(1, "hello")) == 200
    await platform.drain()
    before, seen = harness.sends(), len(harness.delivered())
    harness.fail(before + 2, "5xx")
    _, key = await create_key(platform.db, name="m", role="marketer",
                              now=platform.clock.now())
    content = {"text": WORDS}
    async with platform.http_client() as client:
        client.headers["Authorization"] = f"Bearer {key}"
        created = await client.post("/api/broadcasts", json={
            "name": "long", "filter": {"channel": harness.channel},
            "variants": [{"name": "A", "percent": 100,
                          "messages": {"en": content, "uk": content}}]})
        assert created.status_code == 201, created.text
        broadcast_id = created.json()["id"]
        started = await client.post(f"/api/broadcasts/{broadcast_id}/start")
        assert started.status_code == 200, started.text
    for _ in range(10):  # past the transient backoff
        await platform.drain()
        platform.fake_time[0] += 120
        platform.clock.advance(timedelta(minutes=2))
    parts = harness.delivered()[seen:]
    assert " ".join(d.text for d in parts).split() == WORDS.split()  # each part once
    assert harness.sends() == before + len(parts) + 1  # the failed call, retried once
    async with platform.db.session() as session:
        statuses = (await session.scalars(select(Outbox.status).where(
            Outbox.broadcast_id == broadcast_id))).all()
    assert list(statuses) == ["sent"] * len(parts)


async def test_a_webhook_delivered_twice_is_processed_once(harness, platform) -> None:
    webhook = harness.webhook(7, "hello")
    assert [await post(platform, harness, webhook) for _ in range(2)] == [200, 200]
    await platform.drain()
    assert await counts(platform) == {"subscribers": 1, "events": 1, "inbound": 1}


async def test_a_forged_webhook_is_refused_and_not_processed(harness, platform) -> None:
    """Every channel verifies its webhooks: a signature (Viber, Facebook) or a shared
    secret (Telegram's header; the console's, which answers only when one is set)."""
    body, _ = harness.webhook(1, "hello")
    assert await post(platform, harness, (body, harness.forged(body))) in (401, 403)
    await platform.drain()
    assert await counts(platform) == {"subscribers": 0, "events": 0, "inbound": 0}
    assert harness.sends() == 0


@pytest.mark.parametrize("body", [b"{not json", b"[]", json.dumps({"x": 1}).encode()],
                         ids=["not-json", "a-list", "no-event"])
async def test_a_malformed_webhook_is_a_400(harness, platform, body: bytes) -> None:
    assert await post(platform, harness, (body, harness.signed(body))) == 400
    await platform.drain()
    assert await counts(platform) == {"subscribers": 0, "events": 0, "inbound": 0}

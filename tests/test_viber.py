"""Viber end to end: signed callbacks (as in Viber's REST API docs) -> engine -> delivery ->
the fake Viber API; the welcome travels in the conversation_started response."""

from __future__ import annotations

import json
import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from bot_platform.config import BotConfig
from bot_platform.models import Message, Outbox, ProcessedEvent, Subscriber
from bot_platform.types import Outgoing
from tests.fakes.viber_api import FakeViberServer
from tests.support.viber import TOKEN, USER, post, started


@pytest.fixture
async def api() -> Any:
    async with FakeViberServer(TOKEN) as server:
        yield server


@pytest.fixture
async def viber(make_platform, api):
    return await make_platform(bots=[BotConfig(id="vb", channel="viber", token=TOKEN,
                                               api_base=api.url,
                                               options={"sender_name": "Example Shop"})])


def text_message(token: int, text: str, tracking: str | None = None) -> dict:
    message: dict[str, Any] = {"type": "text", "text": text}
    if tracking is not None:
        message["tracking_data"] = tracking
    return {"event": "message", "timestamp": 1457764197627, "message_token": token,
            "sender": USER, "message": message}


async def test_conversation_started_is_answered_in_the_response(viber, api) -> None:
    response = await post(viber, started())
    assert response.status_code == 200
    welcome = response.json()
    assert welcome["type"] == "text" and welcome["text"].startswith("Вітаємо, Olena!")
    assert welcome["sender"] == {"name": "Example Shop"}
    buttons = welcome["keyboard"]["Buttons"]
    assert [b["ActionType"] for b in buttons] == ["reply", "reply", "open-url"]
    await viber.drain()
    assert api.sent() == []  # it travelled in the response, not through the API
    async with viber.db.session() as session:
        assert await session.scalar(select(Outbox.status)) == "sent"

    # The user subscribes by pressing a keyboard button: its ActionBody comes back.
    press = text_message(1, buttons[1]["ActionBody"], tracking=welcome["tracking_data"])
    assert (await post(viber, press)).status_code == 200
    await viber.drain()
    [reply] = api.sent(USER["id"])
    assert reply["text"] == "Яка ваша електронна адреса?"
    assert api.calls[-1].token == TOKEN


async def test_bad_missing_signature_403_malformed_400(viber, api, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        assert (await post(viber, started(), token="wrong")).status_code == 403
        assert (await post(viber, started(), token=None)).status_code == 403
        assert (await post(viber, b"not json")).status_code == 400
        assert (await post(viber, {"no": "event"})).status_code == 400
    assert any("rejected webhook" in r.message for r in caplog.records)
    assert any("malformed webhook" in r.message for r in caplog.records)
    async with viber.db.session() as session:
        assert await session.scalar(select(func.count()).select_from(Subscriber)) == 0
        assert await session.scalar(select(func.count()).select_from(ProcessedEvent)) == 0
    assert (await post(viber, {"event": "webhook", "timestamp": 1,
                               "message_token": 9})).status_code == 200
    assert (await post(viber, {"event": "client_status", "timestamp": 1,
                               "user_id": "u"})).status_code == 200


async def test_unsubscribed_stops_all_sends(viber, api) -> None:
    await post(viber, started())
    await post(viber, {"event": "unsubscribed", "timestamp": 1457764197627,
                       "user_id": USER["id"], "message_token": 4912661846655238146})
    viber.clock.advance(timedelta(days=5))
    await viber.drain()
    assert api.sent() == []
    async with viber.db.session() as session:
        assert await session.scalar(select(Subscriber.status)) == "unsubscribed"


async def test_delivered_and_seen_update_message_status(viber, api) -> None:
    await post(viber, text_message(10, "feedback"))
    await viber.drain()
    [sent] = [c for c in api.calls if c.ok]
    async with viber.db.session() as session:
        token = await session.scalar(select(Message.channel_message_id).where(
            Message.direction == "out"))
    assert sent.ok and token
    for kind in ("delivered", "seen"):
        await post(viber, {"event": kind, "timestamp": 1, "message_token": int(token),
                           "user_id": USER["id"]})
        async with viber.db.session() as session:
            status = await session.scalar(select(Message.status).where(
                Message.channel_message_id == token))
        assert status == {"delivered": "delivered", "seen": "read"}[kind]


async def test_unsubscribed_user_answer_blocks_and_api_errors_map(viber, api) -> None:
    channel = viber.channel("viber", "vb")
    api.unsubscribed.add("gone")
    assert (await channel.send("gone", Outgoing(text="x"))).status == "blocked"
    api.statuses.append(12)
    assert (await channel.send("u", Outgoing(text="x"))).status == "retry_after"
    api.http_failures.append(503)
    assert (await channel.send("u", Outgoing(text="x"))).status == "transient"
    bad = viber.channel("viber", "vb")
    bad.token = "wrong"
    assert (await bad.send("u", Outgoing(text="x"))).status == "failed"


async def test_broadcast_uses_batches_of_300_and_maps_failures(viber, api) -> None:
    channel = viber.channel("viber", "vb")
    recipients = [f"user-{n}" for n in range(650)]
    api.unsubscribed.update({"user-5", "user-640"})
    results = await channel.send_many(recipients, Outgoing(text="Spring sale"))
    batches = [len(c.body["broadcast_list"]) for c in api.calls
               if c.method == "broadcast_message"]
    assert batches == [300, 300, 50]
    assert results["user-5"].status == "blocked" and results["user-640"].status == "blocked"
    assert sum(r.status == "sent" for r in results.values()) == 648


async def test_rendering_keyboard_picture_and_rich_media(viber, api) -> None:
    from bot_platform.types import Button, Card, QuickReply

    channel = viber.channel("viber", "vb")
    await channel.send("u", Outgoing(text="Share your phone?", quick_replies=(
        QuickReply(title="Share", request="phone"), QuickReply(title="No", payload="no"))))
    keyboard = api.sent("u")[-1]["keyboard"]["Buttons"]
    assert [b["ActionType"] for b in keyboard] == ["share-phone", "reply"]
    await channel.send("u", Outgoing(text="Look", image_url="https://img.example/x.jpg"))
    assert api.sent("u")[-1] == {**api.sent("u")[-1], "type": "picture",
                                 "media": "https://img.example/x.jpg", "text": "Look"}
    await channel.send("u", Outgoing(cards=(Card(
        title="Cream", subtitle="29 EUR", image_url="https://img.example/c.jpg",
        url="https://shop.example/c", buttons=(Button(title="Buy", url="https://s/c"),)),)))
    rich = api.sent("u")[-1]
    assert rich["type"] == "rich_media" and rich["min_api_version"] == 2
    assert rich["rich_media"]["Buttons"][0]["Image"] == "https://img.example/c.jpg"


async def test_setup_registers_the_webhook(viber, api) -> None:
    await viber.channel("viber", "vb").setup("https://bots.example.com/webhooks/viber/vb")
    [call] = [c for c in api.calls if c.method == "set_webhook"]
    assert call.body["url"] == "https://bots.example.com/webhooks/viber/vb"
    assert "conversation_started" in call.body["event_types"]


async def test_contact_and_deep_link_context(viber, api) -> None:
    response = await post(viber, started(token=77, context="promo-spring"))
    assert response.json()["text"].startswith("Весна прийшла, Olena!")
    await post(viber, {"event": "message", "timestamp": 2, "message_token": 78,
                       "sender": USER, "message": {"type": "contact", "contact": {
                           "name": "Olena", "phone_number": "+380501112233"}}})
    async with viber.db.session() as session:
        subscriber = await session.scalar(select(Subscriber))
        assert subscriber.source_ref == "promo-spring"
        assert subscriber.attributes["phone"] == "+380501112233"


# ---- what the real API refuses or shows wrongly (issue 14, items 1 and 2) -----------------

def reply_buttons(body: dict) -> list[dict]:
    cells = body.get("keyboard", {}).get("Buttons", []) + body.get("rich_media", {}).get(
        "Buttons", [])
    return [b for b in cells if b["ActionType"] == "reply"]


async def test_the_fake_refuses_what_the_docs_refuse(api) -> None:
    """The carousel the platform used to send (a caption cell without ActionBody, cards of
    3+2+1 rows in 6x7 groups) and a reply button echoing its token are badData."""
    import aiohttp

    from tests.fakes.viber_api import check_message

    sender = {"name": "Shop"}
    old_card = [{"Columns": 6, "Rows": 3, "ActionType": "open-url",
                 "ActionBody": "https://s.example/p", "Image": "https://s.example/p.jpg"},
                {"Columns": 6, "Rows": 2, "Text": "Cream\n29 EUR", "ActionType": "none"},
                {"Columns": 6, "Rows": 1, "Text": "View", "ActionType": "open-url",
                 "ActionBody": "https://s.example/p"}]
    rich = {"type": "rich_media", "min_api_version": 2, "sender": sender, "rich_media": {
        "Type": "rich_media", "ButtonsGroupColumns": 6, "ButtonsGroupRows": 7,
        "Buttons": old_card * 2}}
    assert "ActionBody is required" in check_message(rich)
    old_card[1]["ActionBody"] = "Cream"
    assert "does not fit group 1" in check_message(rich)  # card 2 would start mid-group
    rich["rich_media"]["Buttons"] = old_card  # one card, one free row
    assert "not filled" in check_message(rich)
    old_card[1]["Rows"] = 3
    assert check_message(rich) is None
    rich["rich_media"]["Buttons"] = old_card * 7
    assert "at most 6" in check_message(rich)

    token = {"ActionType": "reply", "ActionBody": "f:spring_promo:hello:b0", "Text": "Yes"}
    keyboard = {"type": "text", "text": "Hi", "sender": sender,
                "keyboard": {"Type": "keyboard", "Buttons": [token]}}
    assert "would show its ActionBody" in check_message(keyboard)
    token["Silent"] = True
    assert "below the API level 2" in check_message(keyboard)
    keyboard["min_api_version"] = 2
    assert check_message(keyboard) is None
    assert "text is required" in check_message({**keyboard, "text": ""})
    assert "7000" in check_message({**keyboard, "text": "x" * 7001})

    async with aiohttp.ClientSession() as http, http.post(
            f"{api.url}/send_message", json={**rich, "receiver": "u"},
            headers={"X-Viber-Auth-Token": TOKEN}) as response:
        answer = await response.json()
    assert answer["status"] == 3 and answer["status_message"].startswith("badData")
    assert api.sent() == [] and len(api.refused()) == 1


async def test_quiz_recommendations_reach_viber_as_a_valid_carousel(viber, api) -> None:
    """The quiz through the webhook: every keyboard's reply buttons are Silent, pressing
    them works, and the product carousel is accepted with one full group per card."""
    from bot_platform.catalog import parse_products, upsert_products
    from tests.fakes.viber_api import check_message

    data = (Path(__file__).parent / "data" / "catalog.csv").read_text()
    products, errors = parse_products(data, "catalog.csv")
    assert errors == []
    await upsert_products(viber.db, products, viber.clock.now())
    welcome = (await post(viber, started())).json()
    assert check_message(welcome) is None  # the reply body is a message too

    async def say(token: int, text: str, tracking: str | None = None) -> list[dict]:
        before = len(api.sent(USER["id"]))
        assert (await post(viber, text_message(token, text, tracking))).status_code == 200
        await viber.drain()
        return api.sent(USER["id"])[before:]

    [question] = await say(100, "quiz")
    for choice, token in ((1, 101), (0, 102)):  # oily, then shine
        buttons = reply_buttons(question)
        assert buttons and all(b["Silent"] is True for b in buttons)
        assert question["min_api_version"] >= 2
        [question] = await say(token, buttons[choice]["ActionBody"],
                               question["tracking_data"])
    result = await say(103, "25")
    assert api.refused() == []
    texts = [m.get("text") for m in result]
    assert "Засоби для вашого догляду:" in texts
    [carousel] = [m for m in result if m["type"] == "rich_media"]
    rich = carousel["rich_media"]
    assert (rich["ButtonsGroupColumns"], rich["ButtonsGroupRows"]) == (6, 7)
    captions = [b["Text"].split("\n")[0] for b in rich["Buttons"] if b.get("Text")
                and "\n" in b["Text"]]
    assert captions == ["Gel cleanser", "Oil-free moisturiser", "Clay mask"]
    assert all(b.get("ActionBody") for b in rich["Buttons"])
    assert sum(b["Rows"] for b in rich["Buttons"]) == 7 * 3  # three full groups


async def test_button_payloads_never_show_as_the_customers_message(viber, api) -> None:
    """Reply buttons and quick replies are Silent (the chat shows nothing, not the
    payload); URL and share-phone buttons are unchanged; min_api_version covers them."""
    from bot_platform.types import Button, Card, QuickReply

    channel = viber.channel("viber", "vb")
    result = await channel.send("u", Outgoing(
        text="Pick one", buttons=(Button(title="Yes", payload="f:spring_promo:hello:b0"),
                                  Button(title="Shop", url="https://shop.example")),
        quick_replies=(QuickReply(title="Phone", request="phone"),
                       QuickReply(title="Later", payload="f:x:y:q1"))))
    assert result.status == "sent", result.reason
    body = api.sent("u")[-1]
    assert [(b["ActionType"], b.get("Silent")) for b in body["keyboard"]["Buttons"]] == [
        ("reply", True), ("open-url", None), ("share-phone", None), ("reply", True)]
    assert body["min_api_version"] == 3  # share-phone
    assert json.loads(body["tracking_data"])["payloads"] == ["f:spring_promo:hello:b0",
                                                             "f:x:y:q1"]
    await channel.send("u", Outgoing(cards=(Card(title="Mask", buttons=(
        Button(title="Add", payload="f:cart:add:b1"),)),)))
    rich = api.sent("u")[-1]
    assert [b["Rows"] for b in rich["rich_media"]["Buttons"]] == [6, 1]
    assert rich["rich_media"]["Buttons"][0]["ActionType"] == "none"
    assert json.loads(rich["tracking_data"])["payloads"] == ["f:cart:add:b1"]
    assert api.refused() == []

"""Facebook Messenger end to end: signed webhook bodies (as in Meta's docs) -> engine ->
delivery -> the Send API of a fake Graph server."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

from bot_platform.config import BotConfig
from bot_platform.models import Message, Outbox, ProcessedEvent, Subscriber
from bot_platform.types import Outgoing
from tests.fakes.graph_api import FakeGraphServer

APP_SECRET = "app-secret-123"
PAGE_ID = "1234567890"


@pytest.fixture
async def graph() -> Any:
    async with FakeGraphServer() as server:
        yield server


@pytest.fixture
async def facebook(make_platform, graph):
    platform = await make_platform(bots=[BotConfig(
        id="page", channel="facebook", token="PAGE-TOKEN", secret=APP_SECRET,
        verify_token="verify-me", api_base=graph.url)])
    graph.clock = platform.clock.now  # the 24-hour and 7-day windows on the same clock
    platform.graph = graph  # post() tells it what the person did
    return platform


def webhook(*events: dict) -> dict:
    return {"object": "page", "entry": [{"id": PAGE_ID, "time": 1767225600000,
                                         "messaging": list(events)}]}


def event(psid: str, ts: int, **kind: Any) -> dict:
    return {"sender": {"id": psid}, "recipient": {"id": PAGE_ID}, "timestamp": ts, **kind}


def get_started(psid: str = "PSID1", ts: int = 1, ref: str | None = None) -> dict:
    postback: dict[str, Any] = {"title": "Get Started", "payload": "GET_STARTED",
                                "mid": f"m-gs-{psid}-{ts}"}
    if ref:
        postback["referral"] = {"ref": ref, "source": "SHORTLINK", "type": "OPEN_THREAD"}
    return event(psid, ts, postback=postback)


async def post(platform, body: dict | bytes, secret: str | None = APP_SECRET):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if isinstance(body, dict) and secret == APP_SECRET and hasattr(platform, "graph"):
        platform.graph.observe(body)
    if secret is not None:
        digest = hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()
        headers["X-Hub-Signature-256"] = f"sha256={digest}"
    async with platform.http_client() as client:
        return await client.post("/webhooks/facebook/page", content=raw, headers=headers)


async def test_verification_handshake(facebook) -> None:
    async with facebook.http_client() as client:
        ok = await client.get("/webhooks/facebook/page", params={
            "hub.mode": "subscribe", "hub.verify_token": "verify-me",
            "hub.challenge": "1158201444"})
        wrong = await client.get("/webhooks/facebook/page", params={
            "hub.mode": "subscribe", "hub.verify_token": "nope", "hub.challenge": "x"})
    assert (ok.status_code, ok.text) == (200, "1158201444")
    assert wrong.status_code == 403


async def test_get_started_runs_the_welcome_flow_and_a_postback_advances_it(
        facebook, graph) -> None:
    assert (await post(facebook, webhook(get_started()))).status_code == 200
    await facebook.drain()
    [greeting] = graph.messages("PSID1")
    template = greeting["attachment"]["payload"]
    assert template["template_type"] == "button"
    assert template["text"].startswith("Hi there! Welcome to Example Shop.")
    buttons = template["buttons"]
    assert [b["type"] for b in buttons] == ["postback", "postback", "web_url"]
    assert [b["title"] for b in buttons] == ["Show me a tip", "Get news by email",
                                              "Open the shop"]
    assert graph.sent("PSID1")[0].access_token == "PAGE-TOKEN"
    assert graph.sent("PSID1")[0].body["messaging_type"] == "RESPONSE"

    press = event("PSID1", 2, postback={"title": "Get news by email", "mid": "m-2",
                                        "payload": buttons[1]["payload"]})
    await post(facebook, webhook(press))
    await facebook.drain()
    assert graph.messages("PSID1")[-1] == {"text": "What is your email address?"}


async def test_bad_or_missing_signature_is_403_and_malformed_is_400(
        facebook, graph, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        assert (await post(facebook, webhook(get_started()), secret="wrong")).status_code == 403
        assert (await post(facebook, webhook(get_started()), secret=None)).status_code == 403
        assert (await post(facebook, b"{broken")).status_code == 400
        assert (await post(facebook, {"object": "page"})).status_code == 400
    assert sum("rejected webhook" in r.message for r in caplog.records) == 2
    assert any("malformed webhook" in r.message for r in caplog.records)
    await facebook.drain()
    assert graph.calls == []
    async with facebook.db.session() as session:
        assert await session.scalar(select(func.count()).select_from(Subscriber)) == 0
        assert await session.scalar(select(func.count()).select_from(ProcessedEvent)) == 0


async def test_outside_the_24_hour_window_only_tagged_messages_go(facebook, graph) -> None:
    await post(facebook, webhook(get_started()))
    await facebook.drain()
    facebook.clock.advance(timedelta(hours=25))
    async with facebook.db.session() as session:
        subscriber = await session.scalar(select(Subscriber))
        queued = await facebook.outbox.enqueue(session, subscriber, [
            (None, Outgoing(text="Spring sale!")),
            (None, Outgoing(text="Your order has shipped", outside_window="POST_PURCHASE_UPDATE"))])
    await facebook.drain()
    async with facebook.db.session() as session:
        rows = {r.id: r for r in (await session.scalars(select(Outbox))).all()}
    untagged, tagged = (rows[i] for i, _ in queued)
    assert untagged.status == "skipped" and untagged.last_error.startswith("outside_window")
    assert tagged.status == "sent"
    last = graph.sent("PSID1")[-1].body
    assert (last["messaging_type"], last["tag"]) == ("MESSAGE_TAG", "POST_PURCHASE_UPDATE")
    assert [m.get("text") for m in graph.messages("PSID1")][-1] == "Your order has shipped"


async def test_a_batched_post_with_three_events_from_two_users(facebook, graph) -> None:
    body = {"object": "page", "entry": [
        {"id": PAGE_ID, "time": 1, "messaging": [get_started("A", 1), get_started("B", 2)]},
        {"id": PAGE_ID, "time": 3, "messaging": [
            event("A", 3, message={"mid": "m-a-3", "text": "Get news by email"})]}]}
    assert (await post(facebook, body)).status_code == 200
    await facebook.drain()
    async with facebook.db.session() as session:
        assert await session.scalar(select(func.count()).select_from(ProcessedEvent)) == 3
    texts_a = [m.get("text") or m["attachment"]["payload"]["text"][:8]
               for m in graph.messages("A")]
    assert texts_a == ["Hi there", "What is your email address?"]  # in order
    assert len(graph.messages("B")) == 1


async def test_quick_replies_referrals_reads_and_deliveries(facebook, graph) -> None:
    await post(facebook, webhook(event("Q", 1, message={"mid": "m-q1", "text": "feedback"})))
    await facebook.drain()
    [ask] = graph.messages("Q")
    replies = ask["quick_replies"]
    assert len(replies) == 11 and replies[10]["title"] == "10"
    await post(facebook, webhook(event("Q", 2, message={
        "mid": "m-q2", "text": "9", "quick_reply": {"payload": replies[9]["payload"]}})))
    await facebook.drain()
    assert graph.messages("Q")[-1]["attachment"]["payload"]["text"].startswith("Thank you")

    mids = [c for c in graph.sent("Q")]
    last_mid = "m_" + str(len(graph.sent()))
    await post(facebook, webhook(event("Q", 3, delivery={"mids": [last_mid],
                                                         "watermark": 3})))
    async with facebook.db.session() as session:
        status = await session.scalar(select(Message.status).where(
            Message.channel_message_id == last_mid))
    assert status == "delivered" and mids
    facebook.clock.advance(timedelta(minutes=1))
    watermark = int((facebook.clock.now()).timestamp() * 1000)
    await post(facebook, webhook(event("Q", 4, read={"watermark": watermark})))
    async with facebook.db.session() as session:
        statuses = set((await session.scalars(select(Message.status).where(
            Message.direction == "out"))).all())
    assert statuses == {"read"}

    await post(facebook, webhook(event("R", 5, referral={
        "ref": "promo-spring", "source": "SHORTLINK", "type": "OPEN_THREAD"})))
    await facebook.drain()
    assert graph.messages("R")[0]["attachment"]["payload"]["text"].startswith("Spring is here")


@pytest.mark.parametrize(("code", "subcode", "status", "expected"), [
    (551, 1545041, 400, "blocked"), (10, 2018278, 400, "outside_window"),
    (613, None, 400, "retry_after"), (4, None, 400, "retry_after"),
    (2, None, 500, "transient"), (190, None, 400, "failed"), (100, None, 400, "failed"),
])
async def test_graph_errors_map_to_send_results(facebook, graph, code, subcode, status,
                                                expected) -> None:
    channel = facebook.channel("facebook", "page")
    graph.fail_next(code, subcode, status)
    assert (await channel.send("X", Outgoing(text="hello"))).status == expected


async def test_rendering_carousels_images_and_long_button_text(facebook, graph) -> None:
    from bot_platform.fitting import fit_message
    from bot_platform.types import Button, Card, QuickReply

    channel = facebook.channel("facebook", "page")

    async def send(message: Outgoing) -> None:
        """The parts the outbox queues, one call each."""
        for part in fit_message(message, channel.capabilities):
            assert (await channel.send("P", part)).status == "sent"

    await send(Outgoing(text="For you:", cards=tuple(
        Card(title=f"Item {n}", subtitle="9.99 EUR", image_url=f"https://img/{n}.jpg",
             url=f"https://shop/{n}", buttons=(Button(title="View", url=f"https://shop/{n}"),))
        for n in range(3))))
    text, carousel = graph.messages("P")
    assert text == {"text": "For you:"}
    elements = carousel["attachment"]["payload"]["elements"]
    assert carousel["attachment"]["payload"]["template_type"] == "generic"
    assert len(elements) == 3 and elements[0]["default_action"]["url"] == "https://shop/0"
    await send(Outgoing(text="word " * 200, buttons=(
        Button(title="Yes", payload="y"),), quick_replies=(
        QuickReply(title="A very long quick reply title", payload="q"),)))
    *plain, template = graph.messages("P")[2:]
    assert plain and len(template["attachment"]["payload"]["text"]) <= 640
    assert template["quick_replies"][0]["title"] == "A very long quick re"


# ---- messaging_type: RESPONSE only answers the person's message (issue 14, item 3) --------

async def test_the_fake_refuses_what_the_send_api_refuses(facebook, graph) -> None:
    from tests.fakes.graph_api import check_message

    def send(message: dict, **envelope: Any) -> str | None:
        return check_message({"recipient": {"id": "P"}, "messaging_type": "UPDATE",
                              "message": message, **envelope})

    button = {"type": "postback", "title": "Yes", "payload": "y"}
    template = {"attachment": {"type": "template", "payload": {
        "template_type": "button", "text": "Pick", "buttons": [button] * 3}}}
    assert send(template) is None
    template["attachment"]["payload"]["buttons"] = [button] * 4
    assert "1-3 buttons" in send(template)
    assert "1-20" in send({"attachment": {"type": "template", "payload": {
        "template_type": "button", "text": "Pick",
        "buttons": [{**button, "title": "A title of 21 chars.."}]}}})
    element = {"title": "Cream", "subtitle": "29 EUR"}
    assert send({"attachment": {"type": "template", "payload": {
        "template_type": "generic", "elements": [element] * 11}}}) is not None
    assert "quick replies" in send({"text": "Rate us", "quick_replies": [
        {"content_type": "text", "title": str(n), "payload": str(n)} for n in range(14)]})
    assert "1-2000" in send({"text": "x" * 2001})
    assert "messaging_type" in send({"text": "hi"}, messaging_type="PROMOTION")
    assert "tag" in send({"text": "hi"}, messaging_type="MESSAGE_TAG", tag="SALE")
    assert "alone" in check_message({"recipient": {"id": "P"}, "sender_action": "typing_on",
                                     "message": {"text": "hi"}})

    await post(facebook, webhook(get_started()))
    await facebook.drain()
    assert graph.sent("PSID1")[-1].body["messaging_type"] == "RESPONSE"
    graph.settle()  # the answer was delivered: whatever comes next is proactive
    channel = facebook.channel("facebook", "page")
    refused = await channel.send("PSID1", Outgoing(text="Sale!", in_reply=True))
    assert refused.status == "failed" and "RESPONSE" in (refused.reason or "")
    assert (await channel.send("PSID1", Outgoing(text="Sale!"))).status == "sent"
    assert graph.sent("PSID1")[-1].body["messaging_type"] == "UPDATE"


async def outbox_errors(platform) -> list[str | None]:
    async with platform.db.session() as session:
        return list((await session.scalars(select(Outbox.last_error).order_by(
            Outbox.id))).all())


async def test_a_broadcast_goes_out_as_update(facebook, graph) -> None:
    from bot_platform.apikeys import create_key

    await post(facebook, webhook(get_started()))
    await facebook.drain()
    graph.settle()
    _, key = await create_key(facebook.db, name="m", role="marketer",
                              now=facebook.clock.now())
    async with facebook.http_client() as client:
        client.headers["Authorization"] = f"Bearer {key}"
        created = await client.post("/api/broadcasts", json={
            "name": "spring", "filter": {"status": "subscribed"},
            "variants": [{"name": "A", "percent": 100,
                          "messages": {"en": {"text": "Spring sale: 20% off!"}}}]})
        assert (await client.post(f"/api/broadcasts/{created.json()['id']}/start")
                ).status_code == 200
        await facebook.drain()
    last = graph.sent("PSID1")[-1].body
    assert (last["messaging_type"], last["message"]) == (
        "UPDATE", {"text": "Spring sale: 20% off!"})
    assert graph.refused() == []


async def test_a_flow_timer_goes_out_as_update(facebook, graph) -> None:
    await post(facebook, webhook(get_started()))
    await facebook.drain()
    facebook.clock.advance(timedelta(hours=20))
    await post(facebook, webhook(event("PSID1", 2, message={"mid": "m-2", "text": "hmm"})))
    await facebook.drain()  # the "did not get that" answer: a RESPONSE
    assert graph.sent("PSID1")[-1].body["messaging_type"] == "RESPONSE"
    graph.settle()
    before = len(graph.sent("PSID1"))
    facebook.clock.advance(timedelta(hours=4, minutes=1))  # the greeting's 1-day timer
    await facebook.drain()
    [tip] = graph.sent("PSID1")[before:]
    assert tip.body["messaging_type"] == "UPDATE"
    assert graph.refused() == []


async def test_agent_replies_respond_in_the_window_then_carry_human_agent_for_7_days(
        facebook, graph) -> None:
    """An agent's reply inside the 24-hour window is a RESPONSE (not a tag it does not
    need); past the window it carries HUMAN_AGENT; past 7 days Facebook refuses it."""
    from bot_platform.apikeys import create_key

    await post(facebook, webhook(get_started()))
    await post(facebook, webhook(event("PSID1", 2, message={"mid": "m-2", "text": "human"})))
    await facebook.drain()  # no settle: the person's "human" is answered by the agent
    _, key = await create_key(facebook.db, name="ann", role="agent",
                              now=facebook.clock.now())
    async with facebook.http_client() as client:
        client.headers["Authorization"] = f"Bearer {key}"
        [waiting] = (await client.get("/api/conversations")).json()
        path = f"/api/conversations/{waiting['id']}"
        await client.post(f"{path}/claim")
        await client.post(f"{path}/messages", json={"text": "Hi, Ann here."})
        await facebook.drain()
        last = graph.sent("PSID1")[-1].body
        assert (last["messaging_type"], last.get("tag")) == ("RESPONSE", None)
        facebook.clock.advance(timedelta(hours=25))
        await client.post(f"{path}/messages", json={"text": "Sorry for the wait."})
        await facebook.drain()
        last = graph.sent("PSID1")[-1].body
        assert (last["messaging_type"], last["tag"]) == ("MESSAGE_TAG", "HUMAN_AGENT")
        facebook.clock.advance(timedelta(days=7))
        await client.post(f"{path}/messages", json={"text": "Still there?"})
        await facebook.drain()
    assert graph.messages("PSID1")[-2:] == [{"text": "Hi, Ann here."},
                                            {"text": "Sorry for the wait."}]
    [late] = graph.refused()
    assert late.body["message"] == {"text": "Still there?"}
    assert (await outbox_errors(facebook))[-1].startswith("outside_window")

"""``{attribute}`` placeholders in button URLs are filled like texts fill them, each value
percent-encoded as one URL component: the shop posts an order over the admin API, the
flow's button reaches the fake Telegram Bot API with the order's id in its URL."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest

from bot_platform.apikeys import create_key
from bot_platform.config import BotConfig
from tests.fakes.telegram_api import FakeTelegramServer

TOKEN = "123456:ABC-DEF1234ghIkl-zyx57W2v1u123ew11"
SECRET = "s3cret-token"

ORDER_FLOW = textwrap.dedent("""
    flow: order_thanks
    triggers: [{on: event, event: order_placed}]
    start: thanks
    states:
      thanks:
        say: order-thanks
        buttons:
          - {label: order-track, url: "https://shop.example.com/track?order={order_placed_id}&src=bot"}
          - {label: order-review, url: "https://shop.example.com/orders/{order_placed_id}/review?items={order_placed_count}"}
          - {label: order-open, url: "{order_placed_url}"}
        end: true
""")


@pytest.fixture
async def shop(make_platform, tmp_path: Path, db_url: str) -> Any:
    flows, locales = tmp_path / "flows", tmp_path / "locales" / "en"
    flows.mkdir()
    locales.mkdir(parents=True)
    (flows / "order_thanks.yaml").write_text(ORDER_FLOW)
    (locales / "order.ftl").write_text(textwrap.dedent("""\
        order-thanks = Thank you for your order { $order_placed_id }!
        order-track = Track it
        order-review = Review it
        order-open = Open it
        default-name = there
        common-fallback = ?
    """))
    async with FakeTelegramServer() as fake:
        platform = await make_platform(
            bots=[BotConfig(id="shop", channel="telegram", token=TOKEN, secret=SECRET,
                            api_base=fake.url)],
            database_url=db_url, flows_dir=flows, locales_dir=tmp_path / "locales")
        _, key = await create_key(platform.db, name="shop", role="marketer",
                                  now=platform.clock.now())
        yield platform, fake, key


async def order_placed(shop: Any, uid: int, data: dict) -> list[list[dict]]:
    """A Telegram user starts the bot, the shop posts its order; the keyboard sent."""
    platform, fake, key = shop
    update = {"update_id": uid, "message": {
        "message_id": 1, "date": 1767225600, "text": "hello",
        "from": {"id": uid, "is_bot": False, "first_name": "Ann", "language_code": "en"},
        "chat": {"id": uid, "type": "private"}}}
    async with platform.http_client() as client:
        response = await client.post(
            "/webhooks/telegram/shop", content=json.dumps(update).encode(),
            headers={"Content-Type": "application/json",
                     "X-Telegram-Bot-Api-Secret-Token": SECRET})
        assert response.status_code == 200
        event = {"name": "order_placed", "channel": "telegram", "bot_id": "shop",
                 "user_id": str(uid), "data": data}
        response = await client.post("/api/events", json=event,
                                     headers={"Authorization": f"Bearer {key}"})
        assert response.json()["status"] == "accepted", response.text
    await platform.drain()
    [sent] = [c for c in fake.sent(uid) if c.params["text"].startswith("Thank you")]
    return sent.params["reply_markup"]["inline_keyboard"]


async def test_order_id_fills_the_button_urls_encoded_as_a_component(shop) -> None:
    keyboard = await order_placed(shop, 501, {
        "id": "A&B 12/3?x=#1", "url": "https://shop.example.com/o/9?k=v"})
    urls = [row[0]["url"] for row in keyboard]
    assert urls == [
        "https://shop.example.com/track?order=A%26B%2012%2F3%3Fx%3D%231&src=bot",
        # a missing attribute is empty, as in texts
        "https://shop.example.com/orders/A%26B%2012%2F3%3Fx%3D%231/review?items=",
        # a URL that starts with a placeholder takes the shop's link as it is
        "https://shop.example.com/o/9?k=v",
    ]


async def test_a_button_whose_url_stays_empty_is_left_out_not_the_message(shop) -> None:
    keyboard = await order_placed(shop, 502, {"id": 42})
    assert [row[0]["text"] for row in keyboard] == ["Track it", "Review it"]
    assert keyboard[0][0]["url"] == "https://shop.example.com/track?order=42&src=bot"
    assert keyboard[1][0]["url"] == "https://shop.example.com/orders/42/review?items="


async def test_a_shop_link_that_is_not_http_is_left_out(shop) -> None:
    keyboard = await order_placed(shop, 503, {"id": 7, "url": "javascript:alert(1)"})
    assert [row[0]["text"] for row in keyboard] == ["Track it", "Review it"]

"""Telegram end to end: real Update JSON over the webhook -> engine -> delivery -> the real
aiogram Bot -> the fake Bot API server; plus polling, limits and rendering."""

from __future__ import annotations

import asyncio
import html
import logging
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select

from bot_platform.config import BotConfig
from bot_platform.fitting import fit_message
from bot_platform.models import Subscriber
from bot_platform.types import Button, Card, Outgoing, QuickReply
from tests.support.telegram import SECRET, TOKEN, callback_update, message_update, post, user


async def test_welcome_with_inline_keyboard_then_a_button_press(telegram, fake) -> None:
    response = await post(telegram, message_update(1, "/start"))
    assert response.status_code == 200
    await telegram.drain()
    [greeting] = fake.sent(1111)
    assert greeting.params["text"].startswith("Вітаємо, Olena!")
    assert greeting.params["parse_mode"] == "HTML"
    keyboard = greeting.params["reply_markup"]["inline_keyboard"]
    assert [row[0]["text"] for row in keyboard] == [
        "Покажіть пораду", "Новини на email", "Відкрити магазин"]
    assert keyboard[2][0]["url"].startswith("https://shop.example.com/")
    payload = keyboard[1][0]["callback_data"]
    assert len(payload.encode()) <= 64

    pressed = await post(telegram, callback_update(2, payload))
    assert pressed.status_code == 200
    # The press is answered in the webhook's response (the spinner stops), no extra call.
    assert pressed.json() == {"method": "answerCallbackQuery", "callback_query_id": "cb-2"}
    await telegram.drain()
    assert fake.texts(1111)[-1] == "Яка ваша електронна адреса?"
    assert fake.of("answerCallbackQuery") == []


async def test_wrong_or_missing_secret_is_401_and_nothing_happens(telegram, fake) -> None:
    for secret in ("wrong", None, ""):
        response = await post(telegram, message_update(1, "/start"), secret=secret)
        assert response.status_code == 401
    await telegram.drain()
    assert fake.calls == []
    async with telegram.db.session() as session:
        assert await session.scalar(select(func.count()).select_from(Subscriber)) == 0


async def test_the_same_update_twice_gets_one_reply(telegram, fake) -> None:
    for _ in range(2):
        assert (await post(telegram, message_update(7, "/start"))).status_code == 200
    await telegram.drain()
    assert len(fake.sent(1111)) == 1


async def test_malformed_json_is_400_and_unknown_updates_200(telegram, fake, caplog) -> None:
    with caplog.at_level(logging.INFO):
        assert (await post(telegram, b"{not json")).status_code == 400
        assert (await post(telegram, {"no": "update"})).status_code == 400
        future = {"update_id": 9, "a_future_update_kind": {"id": 1}}
        assert (await post(telegram, future)).status_code == 200
        edited = {"update_id": 10, "edited_message": message_update(10, "x")["message"]}
        assert (await post(telegram, edited)).status_code == 200
    assert any("malformed webhook" in r.message for r in caplog.records)
    assert any("unused kind" in r.message for r in caplog.records)
    await telegram.drain()
    assert fake.calls == []


async def test_deep_link_ref_is_stored_and_starts_its_flow(telegram, fake) -> None:
    await post(telegram, message_update(1, "/start promo-spring"))
    await telegram.drain()
    assert fake.texts(1111)[0].startswith("Весна прийшла, Olena!")
    async with telegram.db.session() as session:
        assert await session.scalar(select(Subscriber.source_ref)) == "promo-spring"


async def test_retry_after_pauses_the_bot_then_everything_arrives_once(make_platform,
                                                                       fake) -> None:
    from bot_platform.config import WorkerSettings
    from bot_platform.ratelimit import MemoryRateLimiter

    # One send at a time, so "nothing after the 429" is not blurred by sends in flight; the
    # rate limiter's clock moves only when the test says, so the pause ends when it says.
    moment = [1000.0]
    telegram = await make_platform(
        bots=[BotConfig(id="shop", channel="telegram", token=TOKEN, secret=SECRET,
                        api_base=fake.url)],
        limiter=MemoryRateLimiter(monotonic=lambda: moment[0]),
        worker=WorkerSettings(concurrency=1, poll_interval=0.05, backoff_base=1.0))
    fake.rate_limit(per_second=None, retry_after=30)  # longer than a row waits in place
    fake.fail_send(2)  # 429 "retry after 30" to the second send
    for uid in (1, 2, 3):
        await post(telegram, message_update(uid * 10, "/start", uid=uid))
    await telegram.drain()
    telegram.clock.advance(timedelta(seconds=31))
    await telegram.drain()
    # After the 429 the bot stays silent until retry_after has passed on its limiter's clock.
    assert [bool(c.params.get("_ok")) for c in fake.of("sendMessage")] == [True, False]
    moment[0] += 31
    telegram.clock.advance(timedelta(seconds=31))
    await telegram.drain()
    assert sorted(int(c.params["chat_id"]) for c in fake.sent()) == [1, 2, 3]
    assert fake.too_many_requests == 1
    assert len(fake.of("sendMessage")) == 4  # the refused one resent once, nothing else


async def test_a_user_who_blocked_the_bot_is_unsubscribed_and_skipped(telegram, fake) -> None:
    fake.block(1111)
    await post(telegram, message_update(1, "/start"))
    await telegram.drain()
    async with telegram.db.session() as session:
        assert await session.scalar(select(Subscriber.status)) == "unsubscribed"
    telegram.clock.advance(timedelta(days=3))
    await telegram.drain()
    assert len(fake.of("sendMessage")) == 1  # the failed one only


async def test_my_chat_member_kicked_unsubscribes(telegram, fake) -> None:
    await post(telegram, message_update(1, "hi"))
    await post(telegram, {"update_id": 2, "my_chat_member": {
        "chat": {"id": 1111, "type": "private"}, "from": user(), "date": 1767225700,
        "old_chat_member": {"status": "member", "user": {"id": 42, "is_bot": True,
                                                         "first_name": "Shop"}},
        "new_chat_member": {"status": "kicked", "until_date": 0,
                            "user": {"id": 42, "is_bot": True, "first_name": "Shop"}}}})
    async with telegram.db.session() as session:
        assert await session.scalar(select(Subscriber.status)) == "unsubscribed"


async def test_polling_replies_and_resumes_from_the_stored_offset(make_platform, fake) -> None:
    config = BotConfig(id="poll", channel="telegram", token=TOKEN, api_base=fake.url,
                       options={"poll_timeout": 1})
    platform = await make_platform(bots=[config])
    channel = platform.channel("telegram", "poll")
    fake.push_update({"message": message_update(0, "/start")["message"]})
    task = asyncio.create_task(channel.poll(platform.engine.handle))
    for _ in range(100):
        if await platform.kv.get("telegram:poll:offset"):
            break
        await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await platform.drain()
    assert fake.texts(1111)[0].startswith("Вітаємо")
    assert await platform.kv.get("telegram:poll:offset") == "2"

    fake.push_update({"message": message_update(0, "2")["message"]})
    restarted = asyncio.create_task(channel.poll(platform.engine.handle))
    for _ in range(100):
        if await platform.kv.get("telegram:poll:offset") == "3":
            break
        await asyncio.sleep(0.05)
    restarted.cancel()
    await asyncio.gather(restarted, return_exceptions=True)
    offsets = [c.params.get("offset") for c in fake.of("getUpdates")]
    assert "2" in offsets  # the restart asked from where the first run stopped
    assert len(fake.sent(1111)) == 1  # the first update was not replayed


async def test_rendering_escapes_splits_and_degrades(telegram, fake) -> None:
    channel = telegram.channel("telegram", "shop")
    long_text = "<b>Tom & Jerry</b> " + "word " * 1000
    for part in fit_message(Outgoing(text=long_text, buttons=(
            Button(title="Go", payload="f:" + "x" * 80),)), channel.capabilities):
        assert (await channel.send("1111", part)).status == "sent"  # one call per part
    parts = fake.sent(1111)
    assert len(parts) == 2 and parts[0].params["text"].startswith("&lt;b&gt;Tom &amp; Jerry")
    # Telegram counts characters after entity parsing: &lt; is one character.
    assert all(len(html.unescape(p.params["text"])) <= 4096 for p in parts)
    token = parts[-1].params["reply_markup"]["inline_keyboard"][0][0]["callback_data"]
    assert token.startswith("~") and len(token) <= 64
    events = await channel.normalize(__import__("aiogram").types.Update.model_validate(
        callback_update(50, token), context={"bot": channel.bot}))
    assert events[0].payload == "f:" + "x" * 80  # the long payload comes back whole

    await channel.send("1111", Outgoing(text="Share?", quick_replies=(
        QuickReply(title="Send my phone", request="phone"), QuickReply(title="No", payload="n"))))
    keyboard = fake.sent(1111)[-1].params["reply_markup"]["keyboard"]
    assert keyboard[0][0] == {"text": "Send my phone", "request_contact": True}

    await channel.send("1111", Outgoing(cards=(
        Card(title="Cream", subtitle="29.00 EUR", image_url="https://img.example.com/c.jpg",
             buttons=(Button(title="View", url="https://shop.example.com/c"),)),)))
    photo = fake.sent(1111)[-1]
    assert photo.method == "sendPhoto" and photo.params["caption"] == "Cream\n29.00 EUR"


async def test_send_results_map_telegram_errors(telegram, fake) -> None:
    channel = telegram.channel("telegram", "shop")
    fake.fail_next(1, status=502)
    assert (await channel.send("1", Outgoing(text="x"))).status == "transient"
    assert (await channel.send("-5", Outgoing(text="x"))).reason == "Bad Request: chat not found"
    fake.block(7)
    assert (await channel.send("7", Outgoing(text="x"))).status == "blocked"
    fake.rate_limit(per_second=0, retry_after=3)
    result = await channel.send("1", Outgoing(text="x"))
    assert (result.status, result.retry_after) == ("retry_after", 3.0)


async def test_setup_registers_the_webhook_with_the_secret(telegram, fake) -> None:
    channel = telegram.channel("telegram", "shop")
    await channel.setup("https://bots.example.com/webhooks/telegram/shop")
    assert fake.webhook["url"] == "https://bots.example.com/webhooks/telegram/shop"
    assert fake.webhook["secret_token"] == SECRET


async def press(platform, fake, update_id: int, title: str, uid: int = 1111) -> None:
    """Press the button titled ``title`` on the last keyboard sent to ``uid``."""
    for call in reversed(fake.sent(uid)):
        markup = call.params.get("reply_markup") or {}
        for row in markup.get("inline_keyboard", []):
            for button in row:
                if button["text"] == title:
                    await post(platform, callback_update(update_id, button["callback_data"],
                                                         uid))
                    await platform.drain()
                    return
        for row in markup.get("keyboard", []):
            for button in row:
                if button["text"] == title:  # a reply keyboard sends its title as text
                    await post(platform, message_update(update_id, title, uid))
                    await platform.drain()
                    return
    raise AssertionError(f"no button {title!r}")


async def test_shipped_quiz_nps_and_roulette_through_telegram(telegram, fake) -> None:
    from bot_platform.models import Conversation
    from bot_platform.promo import import_codes

    await post(telegram, message_update(1, "тест"))
    await telegram.drain()
    assert fake.texts(1111)[-1].startswith("Підберімо ваш догляд.")
    await press(telegram, fake, 2, "Блищить повністю")
    await press(telegram, fake, 3, "Блиск і пори")
    await post(telegram, message_update(4, "27"))
    await telegram.drain()
    assert any(t.startswith("Вашій шкірі подобається легкість") for t in fake.texts(1111))

    await post(telegram, message_update(5, "відгук"))
    await telegram.drain()
    await press(telegram, fake, 6, "2")  # NPS quick replies are a reply keyboard
    await press(telegram, fake, 7, "Доставка")
    await post(telegram, message_update(8, "коробка пошкоджена"))
    await telegram.drain()
    assert fake.texts(1111)[-1].startswith("Дякуємо! Незабаром тут вам відповість")
    async with telegram.db.session() as session:
        assert (await session.scalar(select(Conversation.status))) == "waiting"

    from tests.support.engine import LowestPoint

    await import_codes(telegram.db, "roulette-10", ["TG-10"], telegram.clock.now())
    telegram.engine.random = LowestPoint()  # the wheel stops at the first prize in stock
    await post(telegram, message_update(20, "spin", uid=2222))
    await telegram.drain()
    await press(telegram, fake, 21, "Крутити!", uid=2222)
    assert fake.texts(2222)[-1] == ("Ви виграли знижку 10%! Натисніть кнопку, щоб "
                                    "отримати код.")
    await press(telegram, fake, 22, "Отримати код", uid=2222)
    assert fake.texts(2222)[-1].startswith("Ваш код: TG-10.")


async def test_abandoned_cart_reminder_reaches_telegram(telegram, fake) -> None:
    from bot_platform.events import EventIn, ingest

    await post(telegram, message_update(1, "hi"))
    await telegram.drain()
    await ingest(telegram.engine, EventIn(
        name="cart_updated", channel="telegram", bot_id="shop", user_id="1111",
        data={"items": [{"title": "Крем", "qty": 1}]}))
    telegram.clock.advance(timedelta(hours=1, seconds=1))
    await telegram.drain()
    assert fake.texts(1111)[-1].startswith("Olena, у вашому кошику залишилося: Крем.")


async def test_viewed_birthday_winback_and_language_through_telegram(telegram, fake) -> None:
    from bot_platform.events import EventIn, ingest
    from bot_platform.promo import import_codes

    def shop_event(name: str, **data: Any) -> EventIn:
        return EventIn(name=name, channel="telegram", bot_id="shop", user_id="1111",
                       data=data)

    await post(telegram, message_update(1, "мова"))
    await telegram.drain()
    await press(telegram, fake, 2, "Polski")
    assert fake.texts(1111)[-1] == "Gotowe! Od teraz będę mówić po polsku."

    await ingest(telegram.engine, shop_event("product_viewed", title="Krem",
                                             url="https://shop.example.com/p/krem"))
    telegram.clock.advance(timedelta(hours=2, seconds=1))
    await telegram.drain()
    assert fake.texts(1111)[-1].startswith("Wciąż myślisz o Krem?")

    await import_codes(telegram.db, "birthday", ["BDAY-TG"], telegram.clock.now())
    await ingest(telegram.engine, shop_event("birthday"))
    await telegram.drain()
    assert "BDAY-TG" in fake.texts(1111)[-1]

    telegram.clock.advance(timedelta(days=31))
    await telegram.drain()
    assert fake.texts(1111)[-1].startswith("Tęsknimy, Olena!")


async def test_the_fake_refuses_what_the_bot_api_refuses(telegram, fake) -> None:
    """The Bot API's documented limits, answered 400 with Telegram's descriptions."""
    import aiohttp

    from tests.fakes.telegram_api import check_send

    def send(**params: Any) -> str | None:
        return check_send("sendMessage", {"chat_id": 1, "parse_mode": "HTML", **params})

    button = {"text": "Go", "callback_data": "x" * 64}
    assert send(text="hi", reply_markup={"inline_keyboard": [[button]]}) is None
    assert send(text="hi", reply_markup={"inline_keyboard": [[{
        **button, "callback_data": "x" * 65}]]}) == "BUTTON_DATA_INVALID"
    assert send(text="hi", reply_markup={"inline_keyboard": [[{
        **button, "callback_data": "й" * 33}]]}) == "BUTTON_DATA_INVALID"  # 66 bytes
    assert send(text="hi", reply_markup={"inline_keyboard": [[{
        **button, "callback_data": ""}]]}) == "BUTTON_DATA_INVALID"
    assert send(text="hi", reply_markup={"inline_keyboard": [[{
        "text": "Go", "url": "shop.example.com"}]]}) == "BUTTON_URL_INVALID"
    assert send(text="hi", reply_markup={"inline_keyboard": [[{"text": "Go"}]]}) == \
        "text buttons are unallowed in the inline keyboard"
    assert send(text="") == "message text is empty"
    assert send(text="&lt;" * 4096) is None  # one character each after parsing
    assert send(text="x" * 4097) == "message is too long"
    assert send(text="😀" * 2049) == "message is too long"  # 4098 UTF-16 units
    assert send(text="Tom & Jerry").startswith("can't parse entities")
    assert send(text="<blink>hi</blink>").startswith("can't parse entities")
    assert check_send("sendPhoto", {"chat_id": 1, "photo": "https://i.example/p.jpg",
                                    "caption": "x" * 1025}) == "message caption is too long"

    async with aiohttp.ClientSession() as http, http.post(
            f"{fake.url}/bot{TOKEN}/sendMessage",
            json={"chat_id": 1111, "text": "x" * 4097}) as response:
        assert (response.status, await response.json()) == (400, {
            "ok": False, "error_code": 400, "description": "Bad Request: message is too long"})
    assert fake.sent() == [] and len(fake.refused()) == 1


async def test_a_button_without_payload_or_url_still_sends(telegram, fake) -> None:
    """An agent's reply button with a title only used to become callback_data "" (1-64
    bytes required): Telegram refused the whole message."""
    channel = telegram.channel("telegram", "shop")
    result = await channel.send("1111", Outgoing(text="Anything else?", buttons=(
        Button(title="Call me back"),)))
    assert result.status == "sent", result.reason
    markup = fake.sent(1111)[-1].params["reply_markup"]["inline_keyboard"]
    assert markup[0][0]["callback_data"] == "Call me back"
    assert fake.refused() == []

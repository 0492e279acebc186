"""The shipped retention flows, walked end to end through the console channel with the
clock advanced instead of sleeping."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from bot_platform.catalog import parse_products, upsert_products
from bot_platform.models import Answer, Subscriber, SubscriberTag
from bot_platform.types import Profile
from tests.support.engine import Chat

DATA = Path(__file__).parent / "data"


@pytest.fixture
async def shop(make_platform):
    platform = await make_platform()
    products, errors = parse_products((DATA / "catalog.csv").read_text(), "catalog.csv")
    assert errors == []
    await upsert_products(platform.db, products, platform.clock.now())
    return platform


async def subscriber_state(platform, user: str) -> tuple[dict, set[str], list[tuple]]:
    async with platform.db.session() as session:
        subscriber = await session.scalar(select(Subscriber).where(Subscriber.user_id == user))
        tags = set((await session.scalars(select(SubscriberTag.tag).where(
            SubscriberTag.subscriber_id == subscriber.id))).all())
        answers = [(a.question, a.value) for a in (await session.scalars(select(Answer).where(
            Answer.subscriber_id == subscriber.id).order_by(Answer.id))).all()]
        return subscriber.attributes, tags, answers


async def test_quiz_dry_path_scores_tags_answers_and_recommends(shop) -> None:
    chat = Chat(shop)
    first = await chat.say("quiz")
    assert first[0].text.startswith("Let's find your routine.")
    assert [b.title for b in first[0].buttons] == [
        "Dry or tight", "Shiny all over", "Shiny only on the T-zone"]
    assert (await chat.say("1"))[0].text == "What bothers you most?"
    assert (await chat.say("Tightness and flaking"))[0].text.startswith("How old are you?")
    assert (await chat.say("old enough"))[0].text.startswith("Please send your age")
    result = await chat.say("34")
    assert result[0].text.startswith("Your skin asks for moisture")
    assert result[1].text == "Products for your routine:"
    shown = [m.text.split("\n")[0] for m in result[2:]]
    assert shown == ["Creamy cleanser", "Rich moisturiser"]  # the night oil is out of stock
    attributes, tags, answers = await subscriber_state(shop, "u1")
    assert (attributes["quiz_dry"], attributes["quiz_oily"], attributes["age"]) == (3, 0, 34)
    assert attributes["routine"] == "dry"
    assert {"routine-dry", "quiz-done"} <= tags
    assert answers == [("skin_type", "dry"), ("concern", "tightness"), ("age", "34")]


async def test_quiz_oily_and_balanced_branches_and_a_retake_resets_scores(shop) -> None:
    chat = Chat(shop)
    await chat.say("quiz")
    await chat.say("2")
    await chat.say("1")
    oily = await chat.say("25")
    assert oily[0].text.startswith("Your skin likes it light")
    assert [m.text.split("\n")[0] for m in oily[2:]] == [
        "Gel cleanser", "Oil-free moisturiser", "Clay mask"]
    await chat.say("quiz")  # retake
    await chat.say("3")
    await chat.say("3")
    balanced = await chat.say("40")
    assert balanced[0].text.startswith("Lucky you")
    attributes, tags, _ = await subscriber_state(shop, "u1")
    assert (attributes["quiz_dry"], attributes["quiz_oily"]) == (1, 1)
    assert "routine-balanced" in tags and "routine-oily" not in tags
    assert "sensitive-skin" in tags


async def test_quiz_speaks_ukrainian(shop) -> None:
    chat = Chat(shop, profile=Profile(first_name="Оля", language="uk"))
    assert (await chat.say("тест"))[0].text.startswith("Підберімо ваш догляд.")


CART = {"items": [{"sku": "cream-rich", "title": "Rich moisturiser", "qty": 2},
                  {"sku": "gel-clean", "title": "Gel cleanser", "qty": 1}]}


async def post(platform, user: str, name: str, data: dict | None = None,
               event_id: str | None = None):
    from bot_platform.events import EventIn, ingest

    return await ingest(platform.engine, EventIn(
        name=name, channel="console", bot_id="console", user_id=user, data=data or {},
        event_id=event_id))


async def test_abandoned_cart_order_within_the_hour_cancels_the_reminders(shop) -> None:
    chat = Chat(shop)
    await chat.say("hello")
    chat.new()
    await post(shop, "u1", "cart_updated", CART)
    await chat.wait(timedelta(minutes=40))
    await post(shop, "u1", "order_placed", {"items": CART["items"]})
    assert await chat.wait(timedelta(hours=1)) == []
    assert await chat.wait(timedelta(days=2)) == []
    _, tags, _ = await subscriber_state(shop, "u1")
    assert "recovered-cart" in tags


async def test_abandoned_cart_reminds_after_an_hour_then_offers_a_code(shop) -> None:
    from bot_platform.promo import import_codes

    await import_codes(shop.db, "cart-recovery", ["CART-AAA1", "CART-AAA2"], shop.clock.now())
    chat = Chat(shop)
    await chat.say("hello")
    chat.new()
    await post(shop, "u1", "cart_updated", CART)
    assert await chat.wait(timedelta(minutes=59)) == []
    [first] = await chat.wait(timedelta(minutes=1))
    assert first.text == ("Alex, you left something in your cart: Rich moisturiser x2, "
                          "Gel cleanser. It is still waiting for you.")
    assert first.buttons[0].url.startswith("https://shop.example.com/cart")
    assert await chat.wait(timedelta(hours=22)) == []
    [second] = await chat.wait(timedelta(hours=1))
    assert second.text.startswith("Still thinking? Here is CART-AAA1 for 10% off")
    assert await chat.wait(timedelta(days=3)) == []


async def test_abandoned_cart_without_codes_left_still_reminds(shop) -> None:
    chat = Chat(shop)
    await chat.say("hello")
    chat.new()
    await post(shop, "u1", "cart_updated", CART)
    await chat.wait(timedelta(hours=1))
    [last] = await chat.wait(timedelta(hours=23))
    assert last.text.startswith("Your cart is still saved: Rich moisturiser x2")


async def test_a_new_cart_update_restarts_the_wait(shop) -> None:
    chat = Chat(shop)
    await chat.say("hello")
    chat.new()
    await post(shop, "u1", "cart_updated", CART)
    await chat.wait(timedelta(minutes=50))
    await post(shop, "u1", "cart_updated", {"items": [{"title": "Clay mask"}]})
    assert await chat.wait(timedelta(minutes=50)) == []
    [reminder] = await chat.wait(timedelta(minutes=10))
    assert "Clay mask" in reminder.text and "Rich moisturiser" not in reminder.text


async def test_viewed_but_not_ordered(shop) -> None:
    chat = Chat(shop)
    await chat.say("hello")
    other = Chat(shop, user="u2")
    await other.say("hello")
    chat.new()
    other.new()
    viewed = {"sku": "mask-clay", "title": "Clay mask",
              "url": "https://shop.example.com/p/mask-clay"}
    await post(shop, "u1", "product_viewed", viewed)
    await post(shop, "u2", "product_viewed", viewed)
    await post(shop, "u2", "order_placed", {"skus": ["mask-clay"]})
    [reminder] = await chat.wait(timedelta(hours=2))
    assert reminder.text == ("Still thinking about Clay mask? Here it is again: "
                             "https://shop.example.com/p/mask-clay")
    assert other.new() == []


async def test_birthday_greeting_with_a_code_each_year(shop) -> None:
    from bot_platform.promo import import_codes

    await import_codes(shop.db, "birthday", ["BDAY-1", "BDAY-2"], shop.clock.now())
    chat = Chat(shop, profile=Profile(first_name="Ann", language="pl"))
    await chat.say("hello")
    chat.new()
    await post(shop, "u1", "birthday", event_id="bday-2026")
    await shop.drain()
    [greeting] = chat.new()
    assert greeting.text.startswith("Wszystkiego najlepszego, Ann! 🎂 Prezent: kod BDAY-1")
    await post(shop, "u1", "birthday", event_id="bday-2026")  # re-posted: once
    await post(shop, "u1", "birthday", event_id="bday-2027")
    await shop.drain()
    assert [m.text.split("kod ")[1][:6] for m in chat.new()] == ["BDAY-2"]


async def test_nps_promoter_is_asked_for_a_review_or_a_referral(shop) -> None:
    chat = Chat(shop)
    [ask] = await chat.say("feedback")
    assert [q.title for q in ask.quick_replies] == [str(n) for n in range(11)]
    [promoter] = await chat.say("10")
    assert [b.title for b in promoter.buttons] == ["Write a review", "Invite a friend"]
    [refer] = await chat.say("Invite a friend")
    async with shop.db.session() as session:
        contact_id = await session.scalar(select(Subscriber.contact_id))
    assert refer.text.endswith(f"https://t.me/ExampleShopBot?start=rf-{contact_id}")
    _, tags, answers = await subscriber_state(shop, "u1")
    assert answers == [("nps", "10")] and "nps-promoter" in tags


async def test_nps_passive_is_asked_what_to_improve(shop) -> None:
    chat = Chat(shop)
    await chat.say("feedback")
    assert (await chat.say("7"))[0].text == "Thanks! What one thing should we improve?"
    assert (await chat.say("faster delivery"))[0].text == "Thank you, we read every answer."
    _, _, answers = await subscriber_state(shop, "u1")
    assert answers == [("nps", "7"), ("nps_improve", "faster delivery")]


async def test_nps_detractor_answers_more_and_waits_for_an_agent(shop) -> None:
    from bot_platform.models import Conversation

    chat = Chat(shop)
    await chat.say("hello")
    chat.new()
    await post(shop, "u1", "order_delivered", {"order": "A-100"})
    await shop.drain()
    assert chat.new()[0].text.startswith("How likely are you to recommend")
    assert (await chat.say("3"))[0].text == "We are sorry to hear that. What went wrong?"
    await chat.say("Delivery")
    [waiting] = await chat.say("the box arrived broken")
    assert waiting.text == "Thanks! A member of our team will answer you here soon."
    assert await chat.say("are you there?") == []  # the bot stays silent now
    async with shop.db.session() as session:
        conversation = await session.scalar(select(Conversation))
    assert (conversation.status, conversation.reason) == ("waiting", "nps-detractor")
    assert conversation.summary == "NPS 3: delivery: the box arrived broken"
    assert conversation.data == {"flow": "nps", "nps": "3", "nps_problem": "delivery",
                                 "nps_detail": "the box arrived broken"}
    _, _, answers = await subscriber_state(shop, "u1")
    assert answers == [("nps", "3"), ("nps_problem", "delivery"),
                       ("nps_detail", "the box arrived broken")]


async def test_winback_starts_once_per_silence_from_the_daily_scan(shop) -> None:
    from bot_platform.models import Job
    from bot_platform.promo import import_codes
    from bot_platform.winback import SCAN_KIND

    await import_codes(shop.db, "winback", ["BACK-1"], shop.clock.now())
    quiet, active = Chat(shop), Chat(shop, user="u2")
    await quiet.say("hello")
    await active.say("hello")
    quiet.new()
    active.new()
    for _ in range(29):
        shop.clock.advance(timedelta(days=1))
        await active.say("still here")
        await shop.drain()
    assert quiet.new() == []  # 29 days: not yet
    active.new()
    shop.clock.advance(timedelta(days=1, seconds=1))
    await shop.drain()
    [offer] = quiet.new()
    assert offer.text == "We miss you, Alex! Here is BACK-1 for 15% off your next order."
    assert active.new() == []
    shop.clock.advance(timedelta(days=3))
    await shop.drain()
    assert quiet.new() == []  # once per silence
    await quiet.say("hi again")
    quiet.new()
    shop.clock.advance(timedelta(days=31))
    await shop.drain()
    assert [m.text for m in quiet.new()] == ["We miss you, Alex! Come and see what is new."]
    async with shop.db.session() as session:
        scans = (await session.scalars(select(Job.status).where(Job.kind == SCAN_KIND))).all()
    assert scans.count("pending") == 1  # exactly one scan is always waiting


async def test_winback_scan_continues_past_a_full_batch(shop, monkeypatch) -> None:
    """A scan that finds more quiet subscribers than one batch goes on where it stopped a
    minute later (it used to start from the first subscriber again and reach nobody new)."""
    from bot_platform import winback

    monkeypatch.setattr(winback, "SCAN_BATCH", 2)
    chats = [Chat(shop, user=f"q{n}") for n in range(5)]
    for chat in chats:
        await chat.say("hello")
        chat.new()
    shop.clock.advance(timedelta(days=30, seconds=1))
    await shop.drain()  # the daily scan: the first batch of 2
    reached = [chat for chat in chats if chat.new()]
    assert len(reached) == 2
    for _ in range(2):  # the follow-up runs, a minute apart: 2 more, then the last one
        shop.clock.advance(timedelta(minutes=1, seconds=1))
        await shop.drain()
        reached += [chat for chat in chats if chat.new()]
    assert sorted(chat.user for chat in reached) == [f"q{n}" for n in range(5)]


async def test_language_choice_overrides_the_messenger_language(shop) -> None:
    chat = Chat(shop, profile=Profile(first_name="Ann", language="en-GB"))
    [ask] = await chat.say("language")
    assert [q.title for q in ask.quick_replies] == ["English", "Українська", "Polski",
                                                    "العربية"]
    assert (await chat.say("العربية"))[0].text == "تم! سأتحدث العربية من الآن فصاعدًا."
    # The messenger still says en-GB; the explicit choice wins from now on.
    assert (await chat.say("/start"))[0].text.startswith("مرحبًا Ann!")
    async with shop.db.session() as session:
        assert await session.scalar(select(Subscriber.locale)) == "ar"

"""The shipped retention flows, walked end to end through the console channel with the
clock advanced instead of sleeping."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from bot_platform.catalog import parse_products, upsert_products
from bot_platform.models import Answer, Subscriber, SubscriberTag
from bot_platform.types import Profile
from tests.test_engine import Chat

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

"""AI answers through the real openai client against a fake OpenAI-compatible server, and
end to end through the engine (the job asks the model outside any transaction)."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from bot_platform.ai.assistant import (
    Assistant,
    MemoryTokenBudget,
    make_client,
    mask_pii,
    unsupported_claims,
)
from bot_platform.ai.config import AiSettings
from bot_platform.ai.knowledge import Knowledge
from bot_platform.models import Conversation, Job
from tests.conftest import ROOT
from tests.fakes.openai_api import FakeOpenAIServer
from tests.support.engine import Chat

INTENTS = {"skin_quiz": "help choosing skin care", "nps": "give feedback"}


@pytest.fixture
async def fake() -> Any:
    async with FakeOpenAIServer() as server:
        yield server


def settings_for(fake: FakeOpenAIServer, **overrides: Any) -> AiSettings:
    return AiSettings(enabled=True, base_url=fake.url, model="fake-model", timeout=2.0,
                      faq_dir=ROOT / "faq", **overrides)


@pytest.fixture
async def assistant(fake):
    settings = settings_for(fake)
    client = make_client(settings)
    yield Assistant(settings, client, Knowledge.load(ROOT / "faq"))
    await client.close()


def test_bm25_finds_the_right_faq_entry_in_each_language() -> None:
    knowledge = Knowledge.load(ROOT / "faq")
    assert knowledge.search("how long does the delivery take to Poland?", "en")[0].title \
        == "How long does delivery take?"
    assert knowledge.search("як повернути товар", "uk")[0].title == "Чи можна повернути товар?"
    # A locale without an FAQ falls back to the default locale's.
    assert knowledge.search("payment methods card", "pl")[0].title.startswith("Which payment")


def test_pii_is_masked_and_unsupported_claims_are_found() -> None:
    assert mask_pii("I am ann@example.com, +380 50 111 22 33") == "I am <email>, <phone>"
    context = "Delivery costs 4.90 EUR. Use code SPRING15."
    assert unsupported_claims("It costs 4.90 EUR with SPRING15.", context) == []
    assert unsupported_claims("Only 3.50 EUR today!", context) == ["3.50 EUR"]
    assert unsupported_claims("Try code SAVE20", context) == ["SAVE20"]


async def test_a_faq_question_gets_the_grounded_answer(assistant, fake) -> None:
    fake.reply_json(action="answer", confidence=0.9,
                    text="Delivery is free for orders over 50 EUR; otherwise 4.90 EUR.")
    decision = await assistant.decide("how much is delivery?", locale="en", intents=INTENTS,
                                      bot_id="b")
    assert (decision.kind, decision.tokens_used) == ("answer", 120)
    assert "free for orders over 50 EUR" in decision.text
    prompt = fake.system_prompt()
    assert "Delivery is free for orders over 50 EUR; otherwise it costs 4.90 EUR." in prompt
    assert "skin_quiz: help choosing skin care" in prompt
    assert fake.requests[-1]["response_format"] == {"type": "json_object"}


async def test_an_invented_price_is_rejected(assistant, fake) -> None:
    fake.reply_json(action="answer", confidence=0.95, text="Delivery costs just 1.99 EUR!")
    decision = await assistant.decide("delivery price?", locale="en", intents=INTENTS,
                                      bot_id="b")
    assert (decision.kind, decision.reason) == ("fallback", "unsupported_claim")


async def test_routes_escalations_and_gibberish(assistant, fake) -> None:
    fake.reply_json(action="route", intent="skin_quiz", confidence=0.8)
    assert (await assistant.decide("what cream should I buy", locale="en", intents=INTENTS,
                                   bot_id="b")).flow == "skin_quiz"
    fake.reply_json(action="escalate", confidence=1)
    assert (await assistant.decide("I want to talk to a person", locale="en",
                                   intents=INTENTS, bot_id="b")).kind == "escalate"
    fake.reply_json(action="unknown", confidence=0.1)
    gibberish = await assistant.decide("asdf qwerty zxcv", locale="en", intents=INTENTS,
                                       bot_id="b")
    assert (gibberish.kind, gibberish.reason) == ("fallback", "unknown")
    fake.reply_json(action="route", intent="skin_quiz", confidence=0.3)
    assert (await assistant.decide("maybe cream?", locale="en", intents=INTENTS,
                                   bot_id="b")).reason == "low_confidence"
    fake.reply_json(action="route", intent="not_a_flow", confidence=0.99)
    assert (await assistant.decide("x", locale="en", intents=INTENTS,
                                   bot_id="b")).kind == "fallback"


async def test_timeouts_errors_and_bad_json_fall_back(assistant, fake) -> None:
    fake.latency = 5.0
    asked = len(fake.requests)
    decision = await assistant.decide("hello?", locale="en", intents=INTENTS, bot_id="b")
    assert (decision.kind, decision.reason) == ("fallback", "timeout")
    assert len(fake.requests) == asked + 1  # given up after one try, not retried
    fake.latency = 0
    fake.failures.append(500)
    assert (await assistant.decide("x", locale="en", intents=INTENTS, bot_id="b")
            ).reason.startswith("error:")
    fake.replies.append("this is not json")
    assert (await assistant.decide("x", locale="en", intents=INTENTS, bot_id="b")
            ).reason == "bad_json"


async def test_an_exhausted_budget_makes_no_call(fake) -> None:
    settings = settings_for(fake, monthly_token_budget=200)
    client = make_client(settings)
    budget = MemoryTokenBudget()
    assistant = Assistant(settings, client, Knowledge.load(ROOT / "faq"), budget)
    try:
        for _ in range(2):
            fake.reply_json(action="unknown")
            await assistant.decide("x", locale="en", intents={}, bot_id="b")
        calls = len(fake.requests)
        decision = await assistant.decide("x", locale="en", intents={}, bot_id="b")
        assert (decision.kind, decision.reason) == ("fallback", "budget_exhausted")
        assert len(fake.requests) == calls == 2
    finally:
        await client.close()


async def test_end_to_end_answers_routes_and_escalates(make_platform, fake) -> None:
    platform = await make_platform(ai=settings_for(fake))
    chat = Chat(platform)
    await chat.say("/start")
    await chat.say("1")
    fake.reply_json(action="answer", confidence=0.9, text="We ship within 24 hours.")
    assert [m.text for m in await chat.say("when do you ship?")] == [
        "We ship within 24 hours."]
    fake.reply_json(action="route", intent="skin_quiz", confidence=0.9)
    assert (await chat.say("help me pick a cream"))[0].text.startswith(
        "Let's find your routine.")
    await chat.say("1")  # answer the quiz's first question: the quiz expects buttons now
    fake.reply_json(action="garbage")
    await chat.say("Dry or tight")
    fake.reply_json(action="unknown", confidence=0.2)
    chat2 = Chat(platform, user="u2")
    assert (await chat2.say("hello there"))[0].text.startswith("Sorry, I did not get that")
    fake.reply_json(action="escalate", confidence=1)
    [waiting] = await chat2.say("I want to talk to a person")
    assert waiting.text == "Thanks! A member of our team will answer you here soon."
    async with platform.db.session() as session:
        conversation = await session.scalar(select(Conversation))
        results = (await session.scalars(select(Job.result).where(
            Job.kind == "ai_reply").order_by(Job.id))).all()
    assert conversation.reason == "ai:asked_for_human"
    assert results == ["answer:ok", "route:skin_quiz", "fallback:unknown",
                       "fallback:unknown", "escalate:asked_for_human"]


async def test_with_ai_disabled_the_catalog_fallback_answers(make_platform, fake) -> None:
    platform = await make_platform()
    chat = Chat(platform)
    await chat.say("/start")
    await chat.say("1")
    assert (await chat.say("when do you ship?"))[0].text.startswith("Sorry, I did not get")
    assert fake.requests == []


async def test_low_confidence_asks_a_clarifying_question(make_platform, fake) -> None:
    platform = await make_platform(ai=settings_for(fake))
    chat = Chat(platform)
    await chat.say("/start")
    await chat.say("1")
    fake.reply_json(action="route", intent="skin_quiz", confidence=0.2)
    assert (await chat.say("hmm creams?"))[0].text.startswith("I am not sure I understood.")

"""Live AI knowledge: catalog changes (API, import) and FAQ file changes reach every
process's index within seconds; Polish and Arabic questions find their locale's FAQ."""

from __future__ import annotations

import os
import re
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from bot_platform.ai.assistant import Assistant, make_client
from bot_platform.ai.knowledge import Knowledge, LiveKnowledge, tokens
from bot_platform.apikeys import create_key
from bot_platform.catalog import ProductIn, upsert_products
from bot_platform.clock import ManualClock
from bot_platform.database import Database
from tests.fakes.openai_api import FakeOpenAIServer
from tests.support.ai import settings_for
from tests.support.engine import Chat
from tests.support.platform import ROOT

RICH = {"sku": "rich", "title": "Rich moisturiser", "url": "https://shop.example.com/rich",
        "price": 29.0, "currency": "EUR", "tags": ["dry skin"]}


@pytest.fixture
async def fake() -> Any:
    async with FakeOpenAIServer() as server:
        yield server


def price_in(prompt: str, price: str) -> bool:
    """The price as the context shows it (29.0, 29.00 or 29,00)."""
    whole, cents = price.split(".")
    return re.search(rf"(?<![\d.,]){whole}[.,]{cents}0?(?!\d)", prompt) is not None


def test_words_meet_across_diacritics_inflection_and_arabic_spellings() -> None:
    assert tokens("Dostawę") == tokens("dostawy") == tokens("DOSTAWE") == ["dostaw"]
    assert tokens("płatność") == tokens("platnosc")
    assert tokens("التوصيل") == tokens("توصيل") == tokens("والتوصيل")
    assert tokens("أسعار") == tokens("اسعار")  # hamza on alef or not
    assert tokens("تكلفة") == tokens("تكلفه")  # taa marbuta typed as haa
    assert tokens("доставку") == tokens("доставка")


@pytest.mark.parametrize(("question", "locale", "title"), [
    ("Ile kosztuje dostawa?", "pl", "Ile kosztuje dostawa?"),
    ("ile kosztuje dostawe", "pl", "Ile kosztuje dostawa?"),  # typed without diacritics
    ("Czy moge zwrocic krem?", "pl", "Czy mogę zwrócić produkt?"),
    ("كم تكلفة التوصيل؟", "ar", "كم تكلفة التوصيل؟"),
    ("هل يمكن إرجاع المنتج", "ar", "هل يمكنني إرجاع منتج؟"),
    ("ما هي طرق الدفع", "ar", "ما طرق الدفع التي تقبلونها؟"),
    # No German FAQ, and an English question in Polish: the default locale's answers.
    ("how much does delivery cost", "de", "How much does delivery cost?"),
    ("which payment methods", "pl", "Which payment methods do you accept?"),
])
def test_a_question_finds_its_locales_faq_or_the_default_ones(question: str, locale: str,
                                                              title: str) -> None:
    assert Knowledge.load(ROOT / "faq").search(question, locale)[0].title == title


async def test_a_polish_question_gets_polish_context_and_a_polish_answer_asked_for(
        fake: FakeOpenAIServer) -> None:
    settings = settings_for(fake)
    client = make_client(settings)
    try:
        for question, locale, expected in [
                ("Ile kosztuje dostawa?", "pl", "Dostawa jest bezpłatna"),
                ("كم تكلفة التوصيل؟", "ar", "التوصيل مجاني"),
                ("Was kostet die delivery?", "de", "Delivery is free")]:
            await Assistant(settings, client, Knowledge.load(ROOT / "faq")).decide(
                question, locale=locale, intents={}, bot_id="b")
            prompt = fake.system_prompt()
            assert expected in prompt
            assert f'"{locale}"' in prompt  # reply in the customer's language
    finally:
        await client.close()


async def test_catalog_and_faq_changes_are_picked_up_within_the_refresh_interval(
        tmp_path: Path) -> None:
    faq = tmp_path / "faq"
    shutil.copytree(ROOT / "faq", faq)
    db = Database(f"sqlite+aiosqlite:///{tmp_path}/k.sqlite3")
    await db.create_all()
    clock = ManualClock()
    live = LiveKnowledge(db, faq, "en", every=2.0, clock=clock)
    try:
        assert await live.refresh(force=True)
        assert live.knowledge.search("rich moisturiser", "en") == []
        await upsert_products(db, [ProductIn(**RICH)], clock.now())
        assert not await live.refresh()  # checked a moment ago: not yet
        clock.advance(timedelta(seconds=2))
        assert await live.refresh()
        [product] = live.knowledge.search("rich moisturiser", "en")
        assert price_in(product.text, "29.0")
        # The same clock tick, a new price: the version mark moves, not the time.
        await upsert_products(db, [ProductIn(**{**RICH, "price": 25.0})], clock.now())
        clock.advance(timedelta(seconds=2))
        assert await live.refresh()
        [product] = live.knowledge.search("rich moisturiser", "en")
        assert price_in(product.text, "25.0") and not price_in(product.text, "29.0")
        clock.advance(timedelta(seconds=2))
        assert not await live.refresh()  # nothing changed: no rebuild
        # An FAQ file edited (or added) on disk.
        _write(faq / "en.yaml", "- question: Do you ship to Mars?\n"
                                "  answer: Only on Tuesdays.\n")
        clock.advance(timedelta(seconds=2))
        assert await live.refresh()
        assert live.knowledge.search("ship to mars", "en")[0].text == "Only on Tuesdays."
        # A broken file keeps the last good knowledge (and logs why).
        _write(faq / "en.yaml", "- question: [unclosed\n")
        clock.advance(timedelta(seconds=2))
        assert not await live.refresh()
        assert live.knowledge.search("ship to mars", "en")[0].text == "Only on Tuesdays."
    finally:
        await db.close()


def _write(path: Path, text: str) -> None:
    """Write and move the mtime on, even on a file system with a coarse clock."""
    before = path.stat().st_mtime_ns
    path.write_text(text, encoding="utf-8")
    os.utime(path, ns=(before + 10**9, before + 10**9))


async def _ask(platform: Any, user: str, question: str, fake: FakeOpenAIServer) -> str:
    chat = Chat(platform, user=user)
    await chat.say("/start")
    await chat.say("1")
    calls = len(fake.requests)
    fake.reply_json(action="unknown", confidence=0.0)
    await chat.say(question)
    assert len(fake.requests) == calls + 1
    return fake.system_prompt()


@pytest.mark.postgres
async def test_a_price_changed_through_one_process_is_in_the_next_prompt_of_every_process(
        make_platform, postgres_url: str, fake: FakeOpenAIServer) -> None:
    """Two platform instances on one PostgreSQL database (as a web and a worker process
    are): the price changes through A's admin API; B's next prompt, and A's, carry it."""
    a = await make_platform(database_url=postgres_url, ai=settings_for(fake),
                            clock=ManualClock())
    b = await make_platform(database_url=postgres_url, ai=settings_for(fake),
                            clock=ManualClock())
    _, key = await create_key(a.db, name="shop", role="marketer", now=a.clock.now())
    headers = {"Authorization": f"Bearer {key}"}
    question = "How much is the Rich moisturiser?"
    async with a.http_client() as client:
        response = await client.post("/api/catalog/products", headers=headers, json=[RICH])
        assert response.json() == {"imported": 1}
        for platform in (a, b):
            platform.clock.advance(timedelta(seconds=2))
        assert price_in(await _ask(b, "b1", question, fake), "29.0")
        response = await client.post("/api/catalog/products", headers=headers,
                                     json=[{**RICH, "price": 25.0}])
        assert response.json() == {"imported": 1}
    for platform in (a, b):
        platform.clock.advance(timedelta(seconds=2))
    for platform, user in ((b, "b2"), (a, "a1")):
        prompt = await _ask(platform, user, question, fake)
        assert price_in(prompt, "25.0") and not price_in(prompt, "29.0"), prompt

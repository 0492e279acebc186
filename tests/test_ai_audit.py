"""An outside audit of the AI answers (issue 17): fresh adversarial cases driven through
the grounding check and end to end (engine -> ai_reply job -> assistant -> fake model ->
console messenger), each one a way an invented fact, a crash or personal data got past
the checks before it was fixed."""

from __future__ import annotations

import gzip
import json
import os
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import delete, select

from bot_platform.ai.assistant import Assistant, make_client, mask_pii, to_source
from bot_platform.ai.budget import MemoryTokenBudget
from bot_platform.ai.grounding import Source, extract, unsupported
from bot_platform.ai.knowledge import Knowledge, LiveKnowledge
from bot_platform.catalog import ProductIn, upsert_products
from bot_platform.clock import ManualClock
from bot_platform.database import Database
from bot_platform.models import AiBudget, Conversation, Job, Product
from tests.fakes.openai_api import FakeOpenAIServer, Reply
from tests.support.ai import (
    CATALOG,
    DELIVERY,
    RETURNS,
    RICH,
    SERUM,
    SOURCES,
    fact,
    settings_for,
)
from tests.support.engine import Chat
from tests.support.platform import ROOT

CITED = [DELIVERY, RETURNS, RICH, SERUM]


def claims(answer: str) -> list[str]:
    return [c.kind for c in unsupported(answer, CITED, CATALOG, question="how much is it?")]


@pytest.mark.parametrize("answer", [
    # A zero-width space splits an invented code into a known word and a number.
    "Use code FREE\u200b100 today.",
    "Use code FREE\u2060100 today.",  # word joiner
    # A quoted local part is still an email address.
    'Write to "refunds"@example.com.',
    # A bare internationalised domain is a link.
    "Our cheaper shop is магазин.рф now.",
    "Buy it at ціни.укр today.",
    # A price word a few words before the number.
    "The price of the Rich moisturiser is now 50.",
    "Ціна на крем Rich moisturiser тепер лише 50.",
    # Amounts and discounts in words.
    "The Rich moisturiser costs fifty euros.",
    "New customers get twenty percent off.",
    "Rich moisturiser коштує п'ятдесят гривень.",
    "Rich moisturiser kosztuje pięćdziesiąt złotych.",
    "سعر Rich moisturiser خمسون يورو.",
    # Persian letters in the currency word, Persian digits.
    "سعر Rich moisturiser هو ۵۰ یورو.",
    # Fullwidth at sign.
    "Write to refunds＠evil-shop.example now.",
    # A bare number right after the name, or after "only".
    "Rich moisturiser — 50.",
    "Rich moisturiser: 50,00",
    "The Rich moisturiser now only 50!",
    "Rich moisturiser тепер лише 50.",
    # Two products in one sentence: each price belongs to the name nearest before it.
    "The Rich moisturiser costs 29 EUR, and the Vitamin C serum costs 29 EUR.",
    "The Rich moisturiser and Vitamin C serum: Rich moisturiser costs 34.50 EUR.",
    "For 34.50 EUR you get the Rich moisturiser and the Vitamin C serum.",
    # Letters standing in for digits.
    "Delivery is free over 1OO EUR.",
    "Call +44 2O 7946 O958.",
])
def test_more_invented_facts_are_refused(answer: str) -> None:
    assert claims(answer)


@pytest.mark.parametrize("answer", [
    "The Rich moisturiser costs 29\u200b.00 EUR.",  # an invisible character is not a fact
    "سعر Rich moisturiser هو ۲۹ یورو.",
    "We ship within 24 hours; the price includes VAT.",
    "Write to support@example.com within thirty days.",
    "Rich moisturiser costs ２９ EUR.",
    "The Rich moisturiser costs 29 EUR, the Vitamin C serum 34.50 EUR.",
    "Rich moisturiser — 29.",
    "The Rich moisturiser ships in just 2 days; only 3 left.",
    "Delivery is free over 5O EUR.",
])
def test_true_facts_still_pass(answer: str) -> None:
    assert claims(answer) == []


def test_masking_sees_through_invisible_and_fullwidth_characters() -> None:
    assert mask_pii("mail ann\u200b@example.com") == "mail <email>"
    assert mask_pii("mail ann＠example.com") == "mail <email>"
    assert mask_pii("call 050\u200b111\u200b22\u200b33") == "call <phone>"


# --- End to end ----------------------------------------------------------------------


@pytest.fixture
async def fake() -> Any:
    async with FakeOpenAIServer() as server:
        yield server


async def ready_chat(make_platform: Any, fake: FakeOpenAIServer, **overrides: Any) -> Chat:
    platform = await make_platform(ai=settings_for(fake, **overrides))
    chat = Chat(platform)
    await chat.say("/start")
    await chat.say("1")
    return chat


@pytest.mark.parametrize(("text", "delivered"), [
    ("We ship\x00 within 24 hours.", "We ship within 24 hours."),
    ("We ship within 24 hours.\ud800", "We ship within 24 hours."),
    ("We \u202eship\u202c within 24 hours.", "We ship within 24 hours."),
])
async def test_control_characters_and_lone_surrogates_never_reach_the_customer(
        make_platform, fake, text: str, delivered: str) -> None:
    chat = await ready_chat(make_platform, fake)
    fake.script(Reply(raw=json.dumps({"choices": [{"index": 0, "finish_reason": "stop",
                                                   "message": {"role": "assistant",
                                                               "content": json.dumps({
                                                                   "action": "answer",
                                                                   "text": text,
                                                                   "confidence": 0.9})}}]}),
                      content_type="application/json"))
    [message] = await chat.say("when do you ship?")
    assert message.text == delivered


async def test_an_invisible_answer_is_no_answer(make_platform, fake) -> None:
    chat = await ready_chat(make_platform, fake)
    fake.reply_json(action="answer", confidence=0.9, text="\u200b\u200d\u2060 \ufeff")
    [message] = await chat.say("when do you ship?")
    assert message.text.startswith("Sorry, I did not get")
    async with chat.platform.db.session() as session:
        result = await session.scalar(select(Job.result).where(Job.kind == "ai_reply"))
    assert result == "fallback:empty_answer"


@pytest.mark.parametrize("usage", [10**20, -5, True, {"total_tokens": 10**30}])
async def test_absurd_usage_neither_raises_nor_spends_the_month(make_platform, fake,
                                                                usage: Any) -> None:
    chat = await ready_chat(make_platform, fake, monthly_token_budget=100_000)
    fake.script(Reply(content=json.dumps({"action": "answer", "confidence": 0.9,
                                          "text": "We ship within 24 hours."}), usage=usage))
    [message] = await chat.say("when do you ship?")
    assert message.text == "We ship within 24 hours."
    async with chat.platform.db.session() as session:
        row = await session.scalar(select(AiBudget))
    request = fake.requests[-1]
    from bot_platform.ai.budget import reservation
    assert 0 < row.spent <= reservation(request["messages"], request["max_tokens"])
    assert row.reserved == 0


async def test_absurd_usage_in_memory_is_bounded_too(fake) -> None:
    settings = settings_for(fake)
    client = make_client(settings)
    budget = MemoryTokenBudget()
    try:
        fake.script(Reply(content='{"action": "unknown"}', usage=10**15))
        await Assistant(settings, client, Knowledge.load(ROOT / "faq"), budget).decide(
            "x", locale="en", intents={}, bot_id="b", now=None)
    finally:
        await client.close()
    assert 0 < sum(budget.used.values()) < 10_000


def completion(content: str) -> bytes:
    return json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                       "choices": [{"index": 0, "finish_reason": "stop", "message": {
                           "role": "assistant", "content": content}}],
                       "usage": {"prompt_tokens": 1, "completion_tokens": 1,
                                 "total_tokens": 2}}).encode()


SHIP = json.dumps({"action": "answer", "confidence": 0.9, "text": "We ship within 24 hours."})


@pytest.mark.parametrize("reply", [
    Reply(raw=b"\xff\xfe{\x00\x80 not utf-8", content_type="application/json"),
    Reply(raw=gzip.compress(b"not json at all"), content_type="application/json",
          headers={"Content-Encoding": "gzip"}),
    Reply(raw=b"garbage", content_type="application/json", headers={"Content-Encoding": "gzip"}),
    Reply(json={"error": {"message": "slow down"}}, status=429),
    Reply(raw="", status=200, content_type="application/json"),
    Reply(raw="null", status=200, content_type="application/json"),
    Reply(raw=completion(json.dumps({"action": "answer", "confidence": 0.9,
                                     "text": "x" * 50_000})),
          content_type="application/json"),
])
async def test_broken_bodies_end_in_the_fallback(make_platform, fake, reply: Reply) -> None:
    chat = await ready_chat(make_platform, fake)
    fake.script(reply)
    [message] = await chat.say("when do you ship?")
    assert message.text.startswith("Sorry, I did not get")


async def test_a_gzip_body_is_read(make_platform, fake) -> None:
    chat = await ready_chat(make_platform, fake)
    fake.script(Reply(raw=gzip.compress(completion(SHIP)), content_type="application/json",
                      headers={"Content-Encoding": "gzip"}))
    assert [m.text for m in await chat.say("when do you ship?")] == ["We ship within 24 hours."]


async def test_retry_after_is_not_waited_for(make_platform, fake) -> None:
    chat = await ready_chat(make_platform, fake)
    fake.script(Reply(raw='{"error": {"message": "busy"}}', status=429,
                      content_type="application/json", headers={"Retry-After": "3600"}),
                Reply(raw='{"error": {"message": "down"}}', status=503,
                      content_type="application/json", headers={"Retry-After": "60"}))
    assert (await chat.say("when do you ship?"))[0].text.startswith("Sorry, I did not get")
    assert (await chat.say("when do you ship?"))[0].text.startswith("Sorry, I did not get")
    assert len(fake.requests) == 2  # no retries


async def test_a_burst_from_one_subscriber_stays_within_the_hourly_limit(make_platform,
                                                                          fake) -> None:
    chat = await ready_chat(make_platform, fake, answers_per_hour=2)
    fake.responder = lambda body: SHIP
    fake.latency = 0.05
    for n in range(8):  # all queued before any is answered
        await chat.platform.engine.handle(chat.console.inbound(chat.user, f"ship {n}?",
                                                               chat.profile))
    await chat.platform.drain()
    assert len(fake.requests) == 2
    assert [m.text for m in chat.new()].count("We ship within 24 hours.") == 2


async def test_the_budget_starts_again_next_month(make_platform, fake) -> None:
    chat = await ready_chat(make_platform, fake, monthly_token_budget=3000)
    fake.responder = lambda body: Reply(content=SHIP, usage=2500)
    assert (await chat.say("when do you ship?"))[0].text == "We ship within 24 hours."
    assert (await chat.say("when do you ship?"))[0].text.startswith("Sorry")
    assert len(fake.requests) == 1
    await chat.wait(timedelta(days=31))  # 2026-01-01 -> February
    assert (await chat.say("when do you ship?"))[0].text == "We ship within 24 hours."
    async with chat.platform.db.session() as session:
        months = (await session.scalars(select(AiBudget.month).order_by(AiBudget.month))).all()
    assert months == ["2026-01", "2026-02"]


HIDDEN = {
    "email": "ann\u200b@example.org",
    "fullwidth email": "bob＠example.org",
    "arabic phone": "٠٥٠١١١٢٢٣٣",
    "card": "4111\u200b1111\u200b1111\u200b1111",
    "quoted email": '"carl"@example.org',
}


async def test_disguised_personal_data_is_masked_everywhere(make_platform, fake,
                                                            caplog) -> None:
    chat = await ready_chat(make_platform, fake)
    fake.reply_json(action="escalate", confidence=1)
    text = "refund me: " + ", ".join(HIDDEN.values())
    with caplog.at_level("DEBUG", logger="bot_platform"):
        await chat.say(text)
    sent = json.dumps(fake.requests, ensure_ascii=False)
    async with chat.platform.db.session() as session:
        stored = json.dumps((await session.scalars(select(Job.payload).where(
            Job.kind == "ai_reply"))).all(), ensure_ascii=False)
        conversation = await session.scalar(select(Conversation))
    stored += json.dumps([conversation.data, conversation.summary], ensure_ascii=False)
    logged = "\n".join(r.getMessage() for r in caplog.records
                       if r.name.startswith("bot_platform"))  # not the SQL driver's echo
    for what, value in HIDDEN.items():
        core = value.replace("\u200b", "").replace("＠", "@").strip('"')
        for where, seen in (("model", sent), ("stored", stored), ("logs", logged)):
            assert value not in seen and core not in seen, (what, where)
            assert "example.org" not in seen and "1111" not in seen, (what, where)


# --- Knowledge ------------------------------------------------------------------------

PRODUCT = {"sku": "rich", "title": "Rich moisturiser", "url": "https://shop.example.com/rich",
           "price": 29.0, "currency": "EUR", "tags": ["dry skin"]}


async def test_a_product_out_of_stock_or_deleted_is_no_longer_offered(tmp_path) -> None:
    db = Database(f"sqlite+aiosqlite:///{tmp_path}/k.sqlite3")
    await db.create_all()
    clock = ManualClock()
    live = LiveKnowledge(db, tmp_path / "no-faq", "en", every=2.0, clock=clock)
    try:
        await upsert_products(db, [ProductIn(**PRODUCT)], clock.now())
        await live.refresh(force=True)
        assert [p.title for p in live.knowledge.search("rich moisturiser", "en")] == [
            "Rich moisturiser"]
        await upsert_products(db, [ProductIn(**{**PRODUCT, "in_stock": False})], clock.now())
        clock.advance(timedelta(seconds=2))
        assert await live.refresh()
        assert live.knowledge.search("rich moisturiser", "en") == []
        assert live.knowledge.products == []
        # Its old price is no fact any more: the name does not make it sayable.
        said = "The Rich moisturiser costs 29 EUR."
        assert unsupported(said, [], [to_source(p) for p in live.knowledge.products])
        async with db.session() as session:
            await session.execute(delete(Product))
        await upsert_products(db, [ProductIn(**{**PRODUCT, "sku": "serum",
                                                "title": "Vitamin C serum"})], clock.now())
        clock.advance(timedelta(seconds=2))
        assert await live.refresh()
        assert [p.title for p in live.knowledge.products] == ["Vitamin C serum"]
    finally:
        await db.close()


async def test_an_faq_file_replaced_atomically_is_seen(tmp_path) -> None:
    """A deploy that renames a new file over the old one, keeping size and modification
    time (rsync -a, cp -p, a tar extract), still reaches the index."""
    faq = tmp_path / "faq"
    faq.mkdir()
    old = faq / "en.yaml"
    old.write_text("- question: Do you ship to Mars?\n  answer: Only on Tuesdays.\n",
                   encoding="utf-8")
    db = Database(f"sqlite+aiosqlite:///{tmp_path}/k.sqlite3")
    await db.create_all()
    clock = ManualClock()
    live = LiveKnowledge(db, faq, "en", every=2.0, clock=clock)
    try:
        await live.refresh(force=True)
        new = tmp_path / "en.yaml.new"
        new.write_text("- question: Do you ship to Mars?\n  answer: Only on Thursday.\n",
                       encoding="utf-8")
        stat = old.stat()
        assert new.stat().st_size == stat.st_size
        os.utime(new, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        os.replace(new, old)
        clock.advance(timedelta(seconds=2))
        assert await live.refresh()
        assert live.knowledge.search("ship to mars", "en")[0].text == "Only on Thursday."
    finally:
        await db.close()


@pytest.mark.parametrize("masking", [True, False])
async def test_a_question_with_nul_and_lone_surrogates_still_reaches_the_model(
        make_platform, fake, masking: bool) -> None:
    chat = await ready_chat(make_platform, fake, mask_personal_data=masking)
    fake.script(SHIP)
    assert [m.text for m in await chat.say("when do\x00 you ship?\ud83d")] == [
        "We ship within 24 hours."]
    asked = fake.user_text()
    assert asked.startswith("when do you ship?")
    assert not any(ch == "\x00" or "\ud800" <= ch <= "\udfff" for ch in asked)


async def test_refs_and_other_fields_never_put_their_values_into_the_answer(fake) -> None:
    settings = settings_for(fake)
    client = make_client(settings)
    products = [{"title": "Rich moisturiser", "price": 29.0, "currency": "EUR",
                 "url": "https://shop.example.com/rich", "description": "dry skin"}]
    assistant = Assistant(settings, client, Knowledge.load(ROOT / "faq", products))
    try:
        fake.reply_json(action="answer", confidence=0.9, text="It suits dry skin.",
                        refs=["https://evil.example.net/1", {"url": "https://evil.example"},
                              -1, 10**100, 1.5, "NaN", [[1]], None, True, "1e9"],
                        url="https://evil.example.net", price="1 EUR",
                        intent="https://evil.example.net")
        decision = await assistant.decide("rich moisturiser for dry skin?", locale="en",
                                          intents={}, bot_id="b")
    finally:
        await client.close()
    assert decision.kind == "answer"
    assert "evil" not in decision.text and "1 EUR" not in decision.text
    assert decision.text.startswith("It suits dry skin.")


INVISIBLE = ["\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u00ad", "\u202e", "\x00"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fact(), st.lists(st.tuples(st.integers(0, 200), st.sampled_from(INVISIBLE)),
                        max_size=4), st.booleans())
def test_invisible_characters_and_fullwidth_forms_change_no_verdict(
        said: tuple[str, bool], inserts: list[tuple[int, str]], wide: bool) -> None:
    sentence, true = said
    for at, char in inserts:
        at %= len(sentence) + 1
        sentence = sentence[:at] + char + sentence[at:]
    if wide:  # digits, letters and signs as fullwidth forms
        sentence = "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" and c not in "." else c
                           for c in sentence)
    assert (unsupported(sentence, SOURCES, CATALOG) == []) == true, sentence


def test_a_percentage_in_a_product_name_is_that_products_fact() -> None:
    retinol = Source("Retinol serum 0.5%", "Price: 39.00 EUR. night", 39.0, "EUR",
                     "https://shop.example.com/retinol", product=True)
    assert unsupported("The Retinol serum 0.5% costs 39 EUR.", [retinol], [retinol]) == []
    assert [c.kind for c in unsupported("The Retinol serum 0.5% is 20% off.", [retinol],
                                        [retinol])] == ["percent"]


@pytest.mark.parametrize("text", ["a" * 200_000, "a." * 100_000, "1" * 200_000,
                                  "O" * 200_000, "ab-" * 70_000])
def test_masking_and_extraction_are_linear_on_long_words(text: str) -> None:
    """A pasted 200,000-letter word was masked in the engine's inbound transaction with a
    pattern that restarted at every letter (minutes of CPU). Linear now (well under a
    second): the alarm, 100 times that, only fires if it is quadratic again."""
    import signal

    def stop(*_: Any) -> None:
        raise TimeoutError("quadratic")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(20)
    try:
        assert mask_pii(text) in (text, "<phone>")
        extract(text)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("budget", [-1, None, "lots", 1.5])
def test_a_negative_or_missing_budget_is_a_configuration_error(budget: Any) -> None:
    from pydantic import ValidationError

    from bot_platform.ai.config import AiSettings

    with pytest.raises(ValidationError):
        AiSettings(monthly_token_budget=budget)


@pytest.mark.parametrize("answer", [
    "See [https://shop.example.com/rich](https://evil.example.net/rich).",
    'See <a href="https://evil.example.net">https://shop.example.com/rich</a>.',
    "See https://shop.example.com/rich?next=https://evil.example.net.",
    "See https://shop.example.com.evil.example.net/rich.",
    "See https://shop.example.com@evil.example.net/rich.",
])
def test_a_trusted_link_text_does_not_carry_an_untrusted_target(answer: str) -> None:
    assert "url" in claims(answer) or "email" in claims(answer)

"""The AI token budget as a reservation (never overspent, whatever the concurrency), the
per-subscriber hourly limit, and personal data masked before it leaves the platform and in
what the AI job stores.

The fake model here bills every call its full reservation, the most the budget allows
for, so "a budget for 5 calls" is exactly 5 reservations and any overspend would show.
"""

from __future__ import annotations

import asyncio
import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from sqlalchemy import func, select

from bot_platform.ai.assistant import Assistant, make_client, mask_pii
from bot_platform.ai.budget import MemoryTokenBudget, SqlTokenBudget, reservation
from bot_platform.ai.config import AiSettings
from bot_platform.ai.knowledge import Knowledge
from bot_platform.clock import SystemClock
from bot_platform.database import Database
from bot_platform.migrations import upgrade
from bot_platform.models import AiBudget, Conversation, Job
from tests.fakes.openai_api import FakeOpenAIServer
from tests.support.ai import settings_for
from tests.support.engine import Chat
from tests.support.platform import ROOT, TestPlatform, WorkerProcess, make_settings, wait_for
from tests.support.services import fresh_postgres_database

QUESTION = "how much is delivery?"


class BillingFake(FakeOpenAIServer):
    """Bills each call the most it could cost: its whole reservation."""

    async def _completions(self, request: web.Request) -> web.Response:
        response = await super()._completions(request)
        if response.status != 200 or response.content_type != "application/json":
            return response
        body = await request.json()
        billed = reservation(body["messages"], body["max_tokens"])
        answer = json.loads(response.body)  # type: ignore[arg-type]
        answer["usage"] = {"prompt_tokens": billed - body["max_tokens"],
                           "completion_tokens": body["max_tokens"], "total_tokens": billed}
        return web.json_response(answer)


@pytest.fixture
async def fake() -> Any:
    async with BillingFake() as server:
        yield server


async def one_reservation(fake: FakeOpenAIServer, settings: AiSettings,
                          intents: dict[str, str] | None = None) -> int:
    """What a call of QUESTION reserves (and the fake bills), measured with one call."""
    client = make_client(settings)
    try:
        await Assistant(settings, client, Knowledge.load(ROOT / "faq")).decide(
            QUESTION, locale="en", intents=intents or {}, bot_id="calibration")
    finally:
        await client.close()
    request = fake.requests.pop()
    return reservation(request["messages"], request["max_tokens"])


def test_a_reservation_bounds_the_prompt_bytes_and_the_answer() -> None:
    messages = [{"role": "system", "content": "é" * 100}, {"role": "user", "content": "hi"}]
    assert reservation(messages, 300) == 200 + 2 + 16 * 3 + 300
    assert reservation(messages, 300, bytes_per_token=2.0) == 101 + 16 * 3 + 300


async def test_memory_budget_reserves_and_settles() -> None:
    budget = MemoryTokenBudget()
    assert await budget.reserve("b", "2026-11", 60, 100)
    assert not await budget.reserve("b", "2026-11", 60, 100)  # 60 + 60 > 100
    await budget.settle("b", "2026-11", 60, 25)  # the call used 25: 35 come back
    assert await budget.reserve("b", "2026-11", 60, 100)
    assert not await budget.reserve("b", "2026-11", 20, 100)
    await budget.settle("b", "2026-11", 60, 0)  # a failed call gives everything back
    assert await budget.spent("b", "2026-11") == 25
    assert await budget.reserve("b", "2026-11", 75, 100)
    assert await budget.reserve("b", "2026-12", 10**9, 0)  # 0: no limit, still counted


async def test_concurrent_reservations_never_exceed_the_limit(db_url: str) -> None:
    """Three "processes" (each its own engine and pool) reserve at once: exactly the
    reservations that fit are granted."""
    databases = [Database(db_url) for _ in range(3)]
    await databases[0].create_all()
    budgets = [SqlTokenBudget(db) for db in databases]
    try:
        granted = await asyncio.gather(*(
            budgets[n % 3].reserve("console:console", "2026-11", 100, 550)
            for n in range(30)))
        assert sum(granted) == 5
        await asyncio.gather(*(budgets[n % 3].settle("console:console", "2026-11", 100, 40)
                               for n in range(5)))
        async with databases[1].session() as session:
            row = await session.get(AiBudget, ("console:console", "2026-11"))
        assert (row.spent, row.reserved) == (200, 0)
        # 200 spent: three more reservations of 100 fit, the fourth does not.
        assert [await budgets[2].reserve("console:console", "2026-11", 100, 550)
                for _ in range(4)] == [True, True, True, False]
    finally:
        for db in databases:
            await db.close()


async def test_concurrent_questions_in_one_process_spend_at_most_the_budget(
        tmp_path: Path, fake: BillingFake) -> None:
    settings = settings_for(fake)
    each = await one_reservation(fake, settings)
    settings = settings_for(fake, monthly_token_budget=5 * each + each // 2)
    db = Database(f"sqlite+aiosqlite:///{tmp_path}/budget.sqlite3")
    await db.create_all()
    client = make_client(settings)
    budget = SqlTokenBudget(db)
    assistant = Assistant(settings, client, Knowledge.load(ROOT / "faq"), budget)
    fake.latency = 0.2  # every call is still in flight while the others ask
    try:
        decisions = await asyncio.gather(*(assistant.decide(
            QUESTION, locale="en", intents={}, bot_id="b") for _ in range(20)))
    finally:
        await client.close()
    reasons = [d.reason for d in decisions]
    assert len(fake.requests) == 5
    assert reasons.count("budget_exhausted") == 15
    async with db.session() as session:
        row = (await session.scalars(select(AiBudget).where(AiBudget.bot_id == "b"))).one()
    assert (row.spent, row.reserved) == (5 * each, 0)
    assert row.spent <= settings.monthly_token_budget
    await db.close()


async def test_a_failed_call_gives_its_reservation_back_and_a_timeout_keeps_it(
        fake: BillingFake) -> None:
    settings = settings_for(fake, timeout=0.5)
    budget = MemoryTokenBudget()
    client = make_client(settings)
    assistant = Assistant(settings, client, Knowledge.load(ROOT / "faq"), budget)
    try:
        fake.failures.append(500)
        failed = await assistant.decide(QUESTION, locale="en", intents={}, bot_id="b")
        assert failed.reason.startswith("error:")
        assert (budget.used, sum(budget.held.values())) == ({("b", _month()): 0}, 0)
        fake.latency = 2.0  # the model may still bill what it generated: the maximum
        timed_out = await assistant.decide(QUESTION, locale="en", intents={}, bot_id="b")
        assert timed_out.reason == "timeout"
        request = fake.requests[-1]
        assert budget.used[("b", _month())] == reservation(request["messages"],
                                                           request["max_tokens"])
        assert sum(budget.held.values()) == 0
    finally:
        await client.close()


def _month() -> str:
    from datetime import datetime

    return datetime.now().strftime("%Y-%m")


async def _ready_chat(platform: Any, user: str) -> Chat:
    chat = Chat(platform, user=user)
    await chat.say("/start")
    await chat.say("1")
    return chat


async def test_a_subscriber_over_the_hourly_limit_gets_the_fallback_without_a_call(
        make_platform, fake: BillingFake) -> None:
    platform = await make_platform(ai=settings_for(fake, answers_per_hour=2))
    chat = await _ready_chat(platform, "u1")
    for _ in range(2):
        fake.reply_json(action="answer", confidence=0.9, text="We ship within 24 hours.")
        assert [m.text for m in await chat.say("when do you ship?")] == [
            "We ship within 24 hours."]
    assert (await chat.say("and to Poland?"))[0].text.startswith("Sorry, I did not get")
    assert len(fake.requests) == 2
    other = await _ready_chat(platform, "u2")  # the limit is per subscriber
    fake.reply_json(action="answer", confidence=0.9, text="We ship within 24 hours.")
    assert (await other.say("when do you ship?"))[0].text == "We ship within 24 hours."
    assert len(fake.requests) == 3
    await chat.wait(timedelta(minutes=61))
    fake.reply_json(action="answer", confidence=0.9, text="2-4 working days.")
    assert (await chat.say("and to Poland?"))[0].text == "2-4 working days."
    async with platform.db.session() as session:
        results = (await session.scalars(select(Job.result).where(
            Job.kind == "ai_reply").order_by(Job.id))).all()
    assert results == ["answer:ok", "answer:ok", "fallback:rate_limited", "answer:ok",
                       "answer:ok"]


PERSONAL = {
    "email": "ann.smith+shop@example.org",
    "phone": "+48 601 234 567",
    "card": "4111 1111 1111 1111",
    "dashed card": "5500-0000-0000-0004",
    "iban": "PL61 1090 1014 0000 0712 1981 2874",
}
MESSAGE = ("Please refund to {iban} or card {card} (old one {dashed card}); reach me at "
           "{email} or {phone}").format_map(PERSONAL)


def test_mask_pii_masks_cards_ibans_emails_and_phones_but_not_dates_or_prices() -> None:
    masked = mask_pii(MESSAGE)
    assert masked == ("Please refund to <iban> or card <card> (old one <card>); reach me at "
                      "<email> or <phone>")
    assert mask_pii("GB29NWBK60161331926819, de89 3704 0044 0532 0130 00.") == \
        "<iban>, <iban>."
    kept = "Order of 2026-11-30: 2 x 1 299.00 EUR, code SPRING15, tracking 1234567"
    assert mask_pii(kept) == kept
    # Digits that fail the checks are still masked when they are long enough for a phone.
    assert mask_pii("card 4111 1111 1111 1112") == "card <phone>"


@pytest.mark.parametrize("masking", [True, False])
async def test_personal_data_stays_in_the_platform(make_platform, fake: BillingFake,
                                                   masking: bool) -> None:
    platform = await make_platform(ai=settings_for(fake, mask_personal_data=masking))
    chat = await _ready_chat(platform, "u1")
    fake.reply_json(action="escalate", confidence=1)
    await chat.say(MESSAGE)
    sent = json.dumps(fake.requests, ensure_ascii=False)
    async with platform.db.session() as session:
        payloads = json.dumps((await session.scalars(select(Job.payload).where(
            Job.kind == "ai_reply"))).all(), ensure_ascii=False)
        conversation = await session.scalar(select(Conversation))
    stored = payloads + json.dumps(conversation.data, ensure_ascii=False)
    for what, value in PERSONAL.items():
        assert (value in sent, value in stored) == (not masking, not masking), what
    if masking:
        assert "<iban> or card <card>" in sent and "<email> or <phone>" in stored


@pytest.mark.postgres
async def test_fifty_questions_over_three_processes_make_at_most_five_calls(
        tmp_path: Path) -> None:
    """The acceptance run: 50 subscribers ask at once, three ``botp worker`` processes on
    PostgreSQL answer, the budget holds 5 calls (each billed its full reservation)."""
    async with fresh_postgres_database() as url, BillingFake() as fake:
        await asyncio.to_thread(upgrade, url)
        platform = TestPlatform(make_settings(url, ai=settings_for(fake)), clock=SystemClock())
        await platform.start()
        fake.latency = 0.3  # calls overlap across the processes
        each = await one_reservation(fake, settings_for(fake), {
            name: flow.spec.intent for name, flow in platform.engine.flows.flows.items()
            if flow.spec.intent})
        limit = 5 * each + each // 2
        console = platform.channel("console", "console")
        for n in range(50):
            await platform.engine.handle(console.inbound(f"u{n}", QUESTION))
        env = {**os.environ, "BOTP_DATABASE_URL": url,
               "BOTP_FLOWS_DIR": str(ROOT / "flows"), "BOTP_LOCALES_DIR": str(ROOT / "locales"),
               "BOTP_AI__ENABLED": "true", "BOTP_AI__BASE_URL": fake.url,
               "BOTP_AI__MODEL": "fake-model", "BOTP_AI__FAQ_DIR": str(ROOT / "faq"),
               "BOTP_AI__MONTHLY_TOKEN_BUDGET": str(limit),
               "BOTP_WORKER__POLL_INTERVAL": "0.1", "BOTP_LOG_LEVEL": "WARNING"}
        workers = [WorkerProcess(env, tmp_path / f"worker{n}.log") for n in range(3)]

        async def count(*where: Any) -> int:
            async with platform.db.session() as session:
                return await session.scalar(select(func.count(Job.id)).where(
                    Job.kind == "ai_reply", *where)) or 0

        try:
            assert await count() == 50
            for worker in workers:
                worker.start()
            await wait_for(lambda: _all_done(count), limit=90, what="50 answered jobs")
            async with platform.db.session() as session:
                row = (await session.scalars(select(AiBudget).where(
                    AiBudget.bot_id == "console:console"))).one()
                results = (await session.scalars(select(Job.result).where(
                    Job.kind == "ai_reply"))).all()
        finally:
            for worker in workers:
                worker.stop()
            await platform.close()
        calls = len(fake.requests)
        assert 1 <= calls <= 5, calls
        assert (row.spent, row.reserved) == (calls * each, 0)
        assert row.spent <= limit
        assert results.count("fallback:budget_exhausted") == 50 - calls
        logs = _logs(tmp_path)
        assert "Traceback" not in logs, logs[-3000:]


def _logs(folder: Path) -> str:
    return "".join(path.read_text() for path in sorted(folder.glob("worker*.log")))


async def _all_done(count: Any) -> bool:
    return await count(Job.status == "done") == 50



def test_the_months_counted_in_kv_move_into_ai_budget(tmp_path: Path) -> None:
    """Upgrading keeps what was spent this month (the old budget lived in ``kv``)."""
    import sqlite3

    url = f"sqlite+aiosqlite:///{tmp_path}/m.sqlite3"
    upgrade(url, "0004_outbox_interactive_index")
    with sqlite3.connect(tmp_path / "m.sqlite3") as connection:
        connection.executemany("INSERT INTO kv (key, value, updated_at) VALUES (?, ?, ?)", [
            ("ai:tokens:console:console:2026-11", "4800", "2026-11-30 00:00:00"),
            ("ai:tokens:telegram:shop:2026-10", "120", "2026-10-31 00:00:00"),
            ("telegram:shop:offset", "77", "2026-11-30 00:00:00")])
    upgrade(url)
    with sqlite3.connect(tmp_path / "m.sqlite3") as connection:
        budgets = connection.execute(
            "SELECT bot_id, month, spent, reserved FROM ai_budget ORDER BY month").fetchall()
        keys = [key for (key,) in connection.execute("SELECT key FROM kv")]
    assert budgets == [("telegram:shop", "2026-10", 120, 0),
                       ("console:console", "2026-11", 4800, 0)]
    assert keys == ["telegram:shop:offset"]

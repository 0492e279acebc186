"""Off-script text mid-flow (issue 14, item 12): a customer at a question with buttons who
types something else is asked the same question again, with its buttons and a word that
reaches a person, and stays where they were; outside any question the fallback answers.
Through the real path: Telegram webhook -> engine -> database -> delivery -> fake Bot API."""

from __future__ import annotations

import html
import json
import re
from typing import Any

import pytest
from sqlalchemy import select

from bot_platform.config import BotConfig
from bot_platform.handoff import DEFAULT_HANDOFF_KEYWORDS
from bot_platform.models import Answer, FlowState
from tests.support.telegram import SECRET, TOKEN

UID = 4242
# The first handoff keyword per locale, and a word of the hint line, per locale.
HINTS = {"en": "Please choose one of the options below",
         "uk": "Будь ласка, оберіть один із варіантів нижче",
         "pl": "Wybierz jedną z opcji poniżej",
         "ar": "يُرجى اختيار أحد الخيارات أدناه"}
FALLBACK = {"en": "Sorry, I did not get that.", "uk": "Вибачте, я не зрозумів.",
            "pl": "Przepraszam, nie zrozumiałem.", "ar": "عذرًا، لم أفهم ذلك."}
QUIZ_WORD = {"en": "quiz", "uk": "тест", "pl": "quiz", "ar": "اختبار"}


@pytest.fixture
async def telegram(make_platform, fake, db_url):
    return await make_platform(database_url=db_url, bots=[BotConfig(
        id="shop", channel="telegram", token=TOKEN, secret=SECRET, api_base=fake.url)])


def _from(language: str) -> dict:
    return {"id": UID, "is_bot": False, "first_name": "Sam", "language_code": language}


async def _post(platform, update: dict) -> None:
    async with platform.http_client() as client:
        response = await client.post(
            "/webhooks/telegram/shop", content=json.dumps(update).encode(),
            headers={"Content-Type": "application/json",
                     "X-Telegram-Bot-Api-Secret-Token": SECRET})
    assert response.status_code == 200
    await platform.drain()


async def say(platform, update_id: int, text: str, language: str) -> None:
    await _post(platform, {"update_id": update_id, "message": {
        "message_id": update_id, "from": _from(language), "date": 1767225600,
        "chat": {"id": UID, "type": "private"}, "text": text}})


async def press(platform, update_id: int, data: str, language: str) -> None:
    await _post(platform, {"update_id": update_id, "callback_query": {
        "id": f"cb-{update_id}", "from": _from(language), "chat_instance": "-1", "data": data,
        "message": {"message_id": 1, "date": 1767225600,
                    "chat": {"id": UID, "type": "private"}, "text": "..."}}})


def plain(text: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", text))


def keyboard(call: Any) -> list[tuple[str, str]]:
    rows = call.params["reply_markup"]["inline_keyboard"]
    return [(button["text"], button["callback_data"]) for row in rows for button in row]


async def quiz_position(platform) -> tuple[str, str, int]:
    async with platform.db.session() as session:
        row = await session.scalar(select(FlowState).where(FlowState.flow == "skin_quiz"))
        return row.state, row.status, row.version


@pytest.mark.parametrize("language", ["en", "uk", "pl", "ar"])
async def test_off_script_text_re_asks_the_question_with_its_buttons(
        telegram, fake, language: str) -> None:
    await say(telegram, 1, QUIZ_WORD[language], language)
    [question] = fake.sent(UID)
    asked = keyboard(question)
    assert len(asked) == 3
    before = await quiz_position(telegram)
    assert before[:2] == ("q_type", "active")

    await say(telegram, 2, "blah", language)
    [again] = fake.sent(UID)[1:]
    text = plain(again.params["text"])
    keyword = DEFAULT_HANDOFF_KEYWORDS[language][0]
    assert HINTS[language] in text and keyword in text
    assert plain(question.params["text"]) in text  # the same question, asked again
    assert keyboard(again) == asked  # with the same buttons
    assert FALLBACK[language] not in text and "/start" not in text
    assert await quiz_position(telegram) == before  # not moved, not re-entered

    # Its buttons still answer it: the flow goes on to the next question.
    await press(telegram, 3, asked[0][1], language)
    assert (await quiz_position(telegram))[0] == "q_concern"
    async with telegram.db.session() as session:
        answers = (await session.scalars(select(Answer.question))).all()
    assert answers == ["skin_type"]


async def test_the_named_word_reaches_a_person(telegram, fake) -> None:
    """The word the hint names really hands the chat to humans."""
    await say(telegram, 1, "quiz", "en")
    await say(telegram, 2, "what?", "en")
    await say(telegram, 3, DEFAULT_HANDOFF_KEYWORDS["en"][0], "en")
    assert plain(fake.sent(UID)[-1].params["text"]).startswith("Thanks! A member of our team")


async def test_outside_any_question_the_fallback_answers(telegram, fake) -> None:
    """A customer whom no question waits on gets the plain fallback."""
    await say(telegram, 1, "hello there", "en")
    [answer] = fake.sent(UID)
    assert plain(answer.params["text"]).startswith(FALLBACK["en"])
    assert "reply_markup" not in answer.params or not answer.params["reply_markup"]

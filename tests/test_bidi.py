"""Names cannot turn the bot's text around, right-to-left messages start right to left, and
Telegram's limits are counted in UTF-16 code units (issue 14, item 5)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bot_platform.apikeys import create_key
from bot_platform.config import BotConfig
from bot_platform.fitting import split_text
from bot_platform.i18n import Catalogs
from bot_platform.text import FSI, PDI, RLM, isolate, utf16_len
from tests.fakes.viber_api import FakeViberServer
from tests.support.platform import ROOT
from tests.support.telegram import SECRET, TOKEN, message_update, post
from tests.support.viber import TOKEN as VIBER_TOKEN
from tests.support.viber import USER as VIBER_USER
from tests.support.viber import post as viber_post
from tests.support.viber import started

EVIL = "\u202eevil"  # RIGHT-TO-LEFT OVERRIDE, then "evil"


def start_from(update_id: int, uid: int, first_name: str, language: str) -> dict:
    update = message_update(update_id, "/start", uid=uid)
    update["message"]["from"].update(first_name=first_name, language_code=language)
    return update


@pytest.mark.parametrize("language", ["en", "ar"])
async def test_a_bidi_override_in_a_first_name_stays_inside_its_isolate(
        telegram, fake, language) -> None:
    assert (await post(telegram, start_from(1, 1111, EVIL, language))).status_code == 200
    assert (await post(telegram, start_from(2, 2222, "Olena", language))).status_code == 200
    await telegram.drain()
    evil = fake.sent(1111)[0].params["text"]
    plain = fake.sent(2222)[0].params["text"]
    assert f"{FSI}{EVIL}{PDI}" in evil
    assert evil.count("\u202e") == 1
    # Everything around the isolated name is the greeting anyone else gets.
    assert evil.replace(f"{FSI}{EVIL}{PDI}", "Olena") == plain


async def test_nothing_in_a_name_can_close_the_isolate_early(telegram, fake) -> None:
    name = f"{PDI}\u202eevil\n\u2067x"  # a stray PDI, a paragraph break, an open RLI
    assert (await post(telegram, start_from(1, 1111, name, "en"))).status_code == 200
    await telegram.drain()
    text = fake.sent(1111)[0].params["text"]
    assert text.startswith(f"Hi {FSI}\u202eevil \u2067x{PDI}{PDI}! Welcome to Example Shop.")


def test_isolation_leaves_ascii_and_balances_the_rest() -> None:
    catalogs = Catalogs.load(ROOT / "locales")
    # Left-to-right values (promo codes, links, Latin and Cyrillic names) stay bare;
    # right-to-left letters and bidi controls are isolated.
    for name in ("Olena", "Олена", "Zoë 😀"):
        assert catalogs.format("en", "welcome-greeting", {"first_name": name}).startswith(
            f"Hi {name}! ")
    for name in ("محمد", "שרה", "a\u200fb", "a\u202ab"):
        assert catalogs.format("en", "welcome-greeting", {"first_name": name}).startswith(
            f"Hi {FSI}{name}{PDI}! ")
    assert isolate(f"a{PDI}{PDI}\u2066b") == f"{FSI}a\u2066b{PDI}{PDI}"
    assert isolate("x\r\ny\u2029z") == f"{FSI}x  y z{PDI}"


@pytest.fixture
def arabic_name_first(tmp_path: Path) -> Path:
    """The shipped catalogs with an Arabic greeting that starts with the name."""
    locales = tmp_path / "locales"
    shutil.copytree(ROOT / "locales", locales)
    welcome = locales / "ar" / "welcome.ftl"
    lines = welcome.read_text(encoding="utf-8").splitlines()
    lines[0] = "welcome-greeting = { $first_name }، أهلًا بك في Example Shop!"
    welcome.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return locales


async def test_an_arabic_message_starting_with_a_latin_name_starts_right_to_left(
        make_platform, fake, arabic_name_first) -> None:
    telegram = await make_platform(
        bots=[BotConfig(id="shop", channel="telegram", token=TOKEN, secret=SECRET,
                        api_base=fake.url)], locales_dir=arabic_name_first)
    await post(telegram, start_from(1, 1111, "Olena", "ar"))
    await post(telegram, start_from(2, 2222, "محمد", "ar"))
    await post(telegram, start_from(3, 3333, "Olena", "en"))
    await telegram.drain()
    assert fake.sent(1111)[0].params["text"] == f"{RLM}Olena، أهلًا بك في Example Shop!"
    # An Arabic name already starts right to left; English needs no mark.
    assert fake.sent(2222)[0].params["text"] == f"{FSI}محمد{PDI}، أهلًا بك في Example Shop!"
    assert not fake.sent(3333)[0].params["text"].startswith(RLM)


async def test_the_viber_welcome_in_arabic_starts_right_to_left(
        make_platform, arabic_name_first) -> None:
    async with FakeViberServer(VIBER_TOKEN) as api:
        viber = await make_platform(bots=[BotConfig(
            id="vb", channel="viber", token=VIBER_TOKEN, api_base=api.url)],
            locales_dir=arabic_name_first)
        body = started()
        body["user"] = {**VIBER_USER, "language": "ar"}
        response = await viber_post(viber, body)
    assert response.json()["text"] == f"{RLM}Olena، أهلًا بك في Example Shop!"


# ---- Telegram counts UTF-16 code units ---------------------------------------------------

async def test_3000_emoji_reach_telegram_as_two_messages_within_4096_units(
        telegram, fake) -> None:
    """An agent's reply of 3000 emoji is 3000 characters but 6000 UTF-16 units: Telegram
    refuses it whole ("message is too long"), so it goes out in two parts."""
    _, key = await create_key(telegram.db, name="ann", role="agent",
                              now=telegram.clock.now())
    agent = {"Authorization": f"Bearer {key}"}
    await post(telegram, message_update(1, "оператор"))
    await telegram.drain()
    async with telegram.http_client() as client:
        [waiting] = (await client.get("/api/conversations", headers=agent)).json()
        await client.post(f"/api/conversations/{waiting['id']}/claim", headers=agent)
        sent = await client.post(f"/api/conversations/{waiting['id']}/messages",
                                 headers=agent, json={"text": "😀" * 3000})
    assert sent.status_code == 202
    before = len(fake.sent(1111))
    await telegram.drain()
    parts = [call.params["text"] for call in fake.sent(1111)[before:]]
    assert len(parts) == 2 and all(call.params.get("_ok") for call in fake.sent(1111))
    assert all(utf16_len(part) <= 4096 for part in parts)
    assert "".join(parts) == "😀" * 3000


def test_splitting_counts_units_and_keeps_words_and_emoji_sequences_whole() -> None:
    words = "słowo😀 " * 1500  # 8 units a word with its space
    chunks = split_text(words.strip(), 4096, utf16=True)
    assert len(chunks) == 3 and all(utf16_len(c) <= 4096 for c in chunks)
    assert all(c.endswith("😀") and c.startswith("słowo") for c in chunks)
    family = "👨\u200d👩\u200d👧"  # one glyph, 8 units
    chunks = split_text("x" + family * 1000, 4096, utf16=True)  # no chunk fits exactly
    assert "".join(chunks) == "x" + family * 1000
    assert all(utf16_len(c) <= 4096 and c.endswith("👧") for c in chunks)
    assert all(c.startswith("👨") for c in chunks[1:])
    assert split_text("a" * 5000, 4096) == ["a" * 4096, "a" * 904]  # characters elsewhere

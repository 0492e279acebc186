"""The prize wheel: a code is reserved at the spin (never announced without one), shown
again by old "get my code" buttons instead of drawn twice, one prize per player, spins
counted atomically, the intro telling the real spins left, and an extra spin for both
sides of a referral. Through Telegram webhooks where buttons matter (old inline buttons
stay live there), on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import itertools
import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from bot_platform.config import BotConfig
from bot_platform.models import GameSpin, GameWin, PromoCode, Referral, Subscriber
from bot_platform.promo import import_codes
from bot_platform.types import Profile
from tests.support.engine import Chat, LowestPoint
from tests.support.telegram import SECRET, TOKEN

WHEEL = textwrap.dedent("""
    flow: wheel
    triggers: [{on: keyword, keywords: [spin]}]
    start: intro
    states:
      intro:
        actions: [{spins_left: {game: test-wheel}}]
        say: roulette-intro
        buttons: [{label: roulette-btn-spin, goto: spin}]
      spin:
        actions:
          - spin:
              game: test-wheel
              MAX_WINS
              prizes: [{name: discount10, weight: 1, label: roulette-prize-10,
                        pool: roulette-10}]
        branch:
          - {when: {attribute: prize, value: no_spins}, goto: no_spins}
          - {when: {attribute: prize, value: already_won}, goto: already_won}
          - {when: {attribute: prize, value: out_of_prizes}, goto: out}
          - goto: won
      won:
        say: roulette-won
        buttons: [{label: roulette-btn-claim, goto: code}]
      code:
        say: roulette-code
        buttons: [{label: roulette-btn-again, goto: spin}]
      already_won: {say: roulette-already-won, end: true}
      no_spins: {say: roulette-no-spins, end: true}
      out: {say: roulette-out, end: true}
""")

WON = "You won 10% off! Tap the button to get your code."
OUT = "Sorry, we are out of prizes. Thank you for playing!"
LOST = "Not this time. Try again!"


def wheel_dir(tmp_path: Path, max_wins: str = "") -> Path:
    flows = tmp_path / "wheel-flows"
    flows.mkdir(exist_ok=True)
    (flows / "wheel.yaml").write_text(WHEEL.replace("MAX_WINS", max_wins))
    return flows


# ---- Telegram: webhooks in, the fake Bot API out ------------------------------------------

_update_ids = itertools.count(1)


async def telegram(make_platform, fake, **overrides: Any):
    return await make_platform(bots=[BotConfig(id="shop", channel="telegram", token=TOKEN,
                                               secret=SECRET, api_base=fake.url)],
                               **overrides)


def _from(uid: int) -> dict:
    return {"id": uid, "is_bot": False, "first_name": f"P{uid}", "language_code": "en"}


async def _post(platform, update: dict) -> None:
    async with platform.http_client() as client:
        response = await client.post(
            "/webhooks/telegram/shop", content=json.dumps(update).encode(),
            headers={"Content-Type": "application/json",
                     "X-Telegram-Bot-Api-Secret-Token": SECRET})
    assert response.status_code == 200, response.text


async def say(platform, uid: int, text: str) -> None:
    update_id = next(_update_ids)
    await _post(platform, {"update_id": update_id, "message": {
        "message_id": update_id, "from": _from(uid), "date": 1767225600,
        "chat": {"id": uid, "type": "private"}, "text": text}})


async def press(platform, uid: int, data: str) -> None:
    """Press an inline button (by its callback data: old buttons stay pressable)."""
    update_id = next(_update_ids)
    await _post(platform, {"update_id": update_id, "callback_query": {
        "id": f"cb-{update_id}", "from": _from(uid), "chat_instance": "-77", "data": data,
        "message": {"message_id": 1, "date": 1767225600,
                    "chat": {"id": uid, "type": "private"}, "text": "..."}}})


def button(fake, uid: int, title: str) -> str:
    """The callback data of the latest inline button titled ``title`` sent to ``uid``."""
    for call in reversed(fake.sent(uid)):
        for row in (call.params.get("reply_markup") or {}).get("inline_keyboard", []):
            for item in row:
                if item["text"] == title:
                    return item["callback_data"]
    raise AssertionError(f"no button {title!r} sent to {uid}")


async def scalar(platform, query) -> Any:
    async with platform.db.session() as session:
        return await session.scalar(query)


issued = select(func.count()).where(PromoCode.issued_at.is_not(None))


# ---- one code per win ---------------------------------------------------------------------


async def test_an_old_get_my_code_button_pressed_again_shows_the_same_code(
        make_platform, fake, tmp_path: Path, db_url: str) -> None:
    platform = await telegram(make_platform, fake, database_url=db_url,
                              flows_dir=wheel_dir(tmp_path))
    await import_codes(platform.db, "roulette-10", ["ONE-1", "ONE-2", "ONE-3"],
                       platform.clock.now())
    await say(platform, 7, "spin")
    await platform.drain()
    await press(platform, 7, button(fake, 7, "Spin!"))
    await platform.drain()
    assert fake.texts(7)[-1] == WON
    claim = button(fake, 7, "Get my code")
    await press(platform, 7, claim)
    await press(platform, 7, claim)  # Telegram keeps the old inline button live
    await asyncio.gather(*(press(platform, 7, claim) for _ in range(3)))
    await platform.drain()
    codes = [t for t in fake.texts(7) if t.startswith("Your code")]
    assert codes == ["Your code: ONE-1. Use it at checkout."] * 5
    assert await scalar(platform, issued) == 1
    assert await scalar(platform, select(func.count()).select_from(GameWin)) == 1
    assert await scalar(platform, select(GameWin.code)) == "ONE-1"


async def test_a_winner_cannot_spin_again_for_another_prize(
        make_platform, fake, tmp_path: Path, db_url: str) -> None:
    platform = await telegram(make_platform, fake, database_url=db_url,
                              flows_dir=wheel_dir(tmp_path))
    await import_codes(platform.db, "roulette-10", ["ONE-1", "ONE-2", "ONE-3"],
                       platform.clock.now())
    await say(platform, 7, "spin")
    await platform.drain()
    spin = button(fake, 7, "Spin!")
    await press(platform, 7, spin)
    await platform.drain()
    await press(platform, 7, button(fake, 7, "Get my code"))
    await platform.drain()
    await press(platform, 7, button(fake, 7, "Spin again"))
    await press(platform, 7, spin)  # the intro's old button
    await say(platform, 7, "spin")
    await platform.drain()
    already = ("You have already won 10% off. Your code: ONE-1. One prize per customer "
               "— thank you for playing!")
    assert fake.texts(7)[-3:] == [already, already,
                                  "Spin the wheel and win a discount! You have no spins left."]
    assert await scalar(platform, issued) == 1
    async with platform.db.session() as session:
        row = (await session.execute(select(GameSpin.spins, GameSpin.wins))).one()
    assert tuple(row) == (1, 1)  # refused spins are not counted


async def test_one_person_on_two_messengers_spinning_at_once_wins_once(
        make_platform, tmp_path: Path, db_url: str) -> None:
    from sqlalchemy import update

    platform = await make_platform(flows_dir=wheel_dir(tmp_path), database_url=db_url)
    await import_codes(platform.db, "roulette-10", ["C-1", "C-2", "C-3"], platform.clock.now())
    platform.engine.random = LowestPoint()
    for user in ("a", "b"):
        await Chat(platform, user=user).say("spin")
    async with platform.db.session() as session:  # one contact, two messenger identities
        contact_id = await session.scalar(select(Subscriber.contact_id).where(
            Subscriber.user_id == "a"))
        await session.execute(update(Subscriber).where(Subscriber.user_id == "b")
                              .values(contact_id=contact_id))
    console = platform.channel("console", "console")
    # Each identity has its own chat lock: only the spin's compare-and-set keeps them apart.
    await asyncio.gather(*(platform.engine.handle(console.inbound(user, "Spin!"))
                           for user in ("a", "b") * 3))
    await platform.drain()
    texts = [m.text for _, m in console.sent]
    assert texts.count(WON) == 1
    assert sum(t.startswith("You have already won 10% off.") for t in texts) == 5
    assert await scalar(platform, issued) == 1


async def test_several_prizes_per_player_when_configured(make_platform, tmp_path) -> None:
    platform = await make_platform(flows_dir=wheel_dir(tmp_path, "max_wins: null"))
    await import_codes(platform.db, "roulette-10", ["M-1", "M-2"], platform.clock.now())
    chat = Chat(platform)
    await chat.say("spin")
    assert (await chat.say("Spin!"))[0].text == WON
    assert (await chat.say("Get my code"))[0].text.startswith("Your code: M-1.")
    assert (await chat.say("Spin again"))[0].text == WON
    assert (await chat.say("Get my code"))[0].text.startswith("Your code: M-2.")
    assert (await chat.say("Spin again"))[0].text == OUT


# ---- draw first, announce after ---------------------------------------------------------


async def test_players_racing_for_the_last_codes_are_never_promised_one_in_vain(
        make_platform, fake, tmp_path: Path, db_url: str) -> None:
    platform = await telegram(make_platform, fake, database_url=db_url,
                              flows_dir=wheel_dir(tmp_path))
    await import_codes(platform.db, "roulette-10", ["LAST-1", "LAST-2", "LAST-3"],
                       platform.clock.now())
    players = list(range(101, 117))
    await asyncio.gather(*(say(platform, uid, "spin") for uid in players))
    await platform.drain()
    spin = button(fake, players[0], "Spin!")
    await asyncio.gather(*(press(platform, uid, spin) for uid in players))
    await platform.drain()
    winners = [uid for uid in players if fake.texts(uid)[-1] == WON]
    losers = [uid for uid in players if fake.texts(uid)[-1] == OUT]
    assert len(winners) == 3 and len(winners) + len(losers) == len(players)
    await asyncio.gather(*(press(platform, uid, button(fake, uid, "Get my code"))
                           for uid in winners))
    await platform.drain()
    codes = {fake.texts(uid)[-1].removeprefix("Your code: ")[:6] for uid in winners}
    assert codes == {"LAST-1", "LAST-2", "LAST-3"}  # every announced winner got a code
    assert await scalar(platform, issued) == 3


async def test_a_prize_with_a_stock_is_won_at_most_that_often(
        make_platform, tmp_path: Path, db_url: str) -> None:
    flow = WHEEL.replace("MAX_WINS", "").replace(
        "pool: roulette-10}", "stock: 2}")
    flows = tmp_path / "stock-flows"
    flows.mkdir()
    (flows / "wheel.yaml").write_text(flow)
    platform = await make_platform(flows_dir=flows, database_url=db_url)
    console = platform.channel("console", "console")
    users = [f"s{n}" for n in range(12)]
    for line in ("spin", "Spin!"):
        await asyncio.gather(*(platform.engine.handle(console.inbound(u, line))
                               for u in users))
        await platform.drain()
    texts = [m.text for _, m in console.sent]
    assert texts.count(WON) == 2 and texts.count(OUT) == 10
    assert await scalar(platform, select(func.count()).select_from(GameWin)) == 2


async def test_200_concurrent_spins_against_50_codes(make_platform, tmp_path: Path,
                                                     db_url: str) -> None:
    platform = await make_platform(flows_dir=wheel_dir(tmp_path), database_url=db_url)
    await import_codes(platform.db, "roulette-10", [f"R10-{n:03}" for n in range(50)],
                       platform.clock.now())
    console = platform.channel("console", "console")
    users = [f"p{n}" for n in range(200)]

    async def everyone(line: str) -> None:
        await asyncio.gather(*(platform.engine.handle(console.inbound(u, line))
                               for u in users))
        await platform.drain()

    await everyone("spin")
    await everyone("Spin!")
    texts = [m.text for _, m in console.sent]
    assert texts.count(WON) == 50 and texts.count(OUT) == 150
    await everyone("Get my code")
    texts = [m.text for _, m in console.sent]
    codes = [t.removeprefix("Your code: ")[:7] for t in texts if t.startswith("Your code")]
    assert len(codes) == 50 and len(set(codes)) == 50  # every winner, a code of their own


# ---- spins: counted atomically, told truthfully --------------------------------------------


async def test_one_player_pressing_spin_at_once_many_times(
        make_platform, fake, db_url: str) -> None:
    platform = await telegram(make_platform, fake, database_url=db_url)  # the shipped wheel
    await say(platform, 9, "spin")
    await platform.drain()
    spin = button(fake, 9, "Spin!")
    # No codes loaded: every prize with a pool is out of stock, so every spin loses.
    await asyncio.gather(*(press(platform, 9, spin) for _ in range(8)))
    await platform.drain()
    texts = fake.texts(9)[1:]
    assert texts.count(LOST) == 3
    assert sum(t.startswith("You have used all your spins.") for t in texts) == 5
    assert await scalar(platform, select(GameSpin.spins)) == 3

    await import_codes(platform.db, "roulette-10", ["R-1", "R-2"], platform.clock.now())
    platform.engine.random = LowestPoint()
    await say(platform, 10, "spin")
    await platform.drain()
    await asyncio.gather(*(press(platform, 10, spin) for _ in range(6)))
    await platform.drain()
    texts = fake.texts(10)[1:]
    assert texts.count("You won 10% off! Tap the button to get your code.") == 1
    assert sum(t.startswith("You have already won 10% off.") for t in texts) == 5
    assert await scalar(platform, issued) == 1


SPINS_LEFT = {
    "en": ["You have 3 spins.", "You have 2 spins.", "You have 1 spin.",
           "You have no spins left."],
    "uk": ["У вас 3 спроби.", "У вас 2 спроби.", "У вас 1 спроба.",
           "У вас не залишилося спроб."],
    "pl": ["Masz 3 obroty.", "Masz 2 obroty.", "Masz 1 obrót.", "Nie masz już obrotów."],
    "ar": ["لديك 3 محاولات.", "لديك محاولتان.", "لديك محاولة واحدة.",
           "لم تتبق لديك أي محاولات."],
}


@pytest.mark.parametrize("locale", sorted(SPINS_LEFT))
async def test_the_intro_tells_the_spins_left(make_platform, locale: str) -> None:
    platform = await make_platform()
    chat = Chat(platform, profile=Profile(first_name="Alex", language=locale))
    for expected in SPINS_LEFT[locale]:
        [intro] = await chat.say("spin")
        assert intro.text.endswith(expected), intro.text
        await chat.say("1")  # no codes loaded: the spin loses (or finds none left)


@pytest.mark.parametrize(("locale", "count", "expected"), [
    ("uk", 5, "У вас 5 спроб."), ("uk", 21, "У вас 21 спроба."),
    ("uk", 22, "У вас 22 спроби."), ("pl", 5, "Masz 5 obrotów."),
    ("pl", 22, "Masz 22 obroty."), ("ar", 5, "لديك 5 محاولات."),
    ("ar", 11, "لديك 11 محاولة."), ("en", 21, "You have 21 spins.")])
def test_spins_left_plurals(locale: str, count: int, expected: str) -> None:
    from bot_platform.i18n import Catalogs
    from tests.support.platform import ROOT

    catalogs = Catalogs.load(ROOT / "locales")
    assert catalogs.format(locale, "roulette-intro", {"spins_left": count}).endswith(expected)


async def test_three_spins_then_a_referral_earns_one_more(make_platform) -> None:
    platform = await make_platform()
    chat = Chat(platform)
    assert (await chat.say("spin"))[0].text.startswith("Spin the wheel")
    for _ in range(3):
        assert (await chat.say("1"))[0].text == LOST
    [done] = await chat.say("1")
    assert done.text.startswith("You have used all your spins.")
    async with platform.db.session() as session:
        contact_id = await session.scalar(select(Subscriber.contact_id).where(
            Subscriber.user_id == "u1"))
    assert done.text.endswith(f"?start=rf-{contact_id}")

    friend = Chat(platform, user="friend")
    await friend.say(f"/start rf-{contact_id}")
    await friend.say(f"/start rf-{contact_id}")  # the same friend again: credited once
    self_referral = Chat(platform, user="u1")
    await self_referral.say(f"/start rf-{contact_id}")
    chat.new()
    assert (await chat.say("spin"))[0].text.endswith("You have 1 spin.")
    assert (await chat.say("1"))[0].text == LOST
    assert (await chat.say("1"))[0].text.startswith("You have used all your spins.")
    async with platform.db.session() as session:
        assert await session.scalar(select(func.count()).select_from(Referral)) == 1
        assert await session.scalar(select(GameSpin.spins)) == 4


async def test_the_referred_friend_gets_the_promised_extra_spin_too(make_platform) -> None:
    platform = await make_platform()
    assert "you both get an extra spin" in platform.engine.catalogs.format("en", "nps-refer")
    chat = Chat(platform)
    assert (await chat.say("spin"))[0].text.endswith("You have 3 spins.")
    async with platform.db.session() as session:
        contact_id = await session.scalar(select(Subscriber.contact_id))
    friend = Chat(platform, user="friend")
    await friend.say(f"/start rf-{contact_id}")
    assert (await friend.say("spin"))[0].text.endswith("You have 4 spins.")
    for _ in range(4):
        assert (await friend.say("1"))[0].text == LOST
    assert (await friend.say("1"))[0].text.startswith("You have used all your spins.")
    assert (await chat.say("spin"))[0].text.endswith("You have 4 spins.")


async def test_winning_a_code_with_the_shipped_wheel(make_platform) -> None:
    platform = await make_platform()
    platform.engine.random = LowestPoint()
    await import_codes(platform.db, "roulette-25", ["BIG-25", "BIG-26"], platform.clock.now())
    chat = Chat(platform)
    await chat.say("roulette")
    [won] = await chat.say("Spin!")  # 10% has no codes: the first prize in stock is 25%
    assert won.text == "You won 25% off! Tap the button to get your code."
    assert (await chat.say("Get my code"))[0].text == "Your code: BIG-25. Use it at checkout."
    await chat.say("roulette")
    [again] = await chat.say("Spin!")  # one prize per customer
    assert again.text.startswith("You have already won 25% off. Your code: BIG-25.")
    async with platform.db.session() as session:
        assert await session.scalar(issued) == 1

"""The prize wheel: codes never handed out twice under concurrency, spin allowance per
contact, an extra spin per referral."""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path

from sqlalchemy import func, select

from bot_platform.models import GameSpin, Referral, Subscriber
from bot_platform.promo import import_codes
from tests.test_engine import Chat

WHEEL = textwrap.dedent("""
    flow: wheel
    triggers: [{on: keyword, keywords: [spin]}]
    start: intro
    states:
      intro:
        say: roulette-intro
        buttons: [{label: roulette-btn-spin, goto: spin}]
      spin:
        actions:
          - spin:
              game: test-wheel
              prizes: [{name: discount10, weight: 1, label: roulette-prize-10,
                        pool: roulette-10}]
        branch:
          - {when: {attribute: prize, value: no_spins}, goto: no_spins}
          - {when: {attribute: prize, value: out_of_prizes}, goto: out}
          - goto: won
      won:
        say: roulette-won
        buttons: [{label: roulette-btn-claim, goto: claim}]
      claim:
        actions:
          - promo_code: {pool: "{prize_pool}", attribute: prize_code, once_per_contact: false}
        branch:
          - {when: {attribute: prize_code, op: exists}, goto: code}
          - goto: out
      code: {say: roulette-code, end: true}
      no_spins: {say: roulette-no-spins, end: true}
      out: {say: roulette-out, end: true}
""")


async def everyone(platform, users: list[str], line: str) -> None:
    console = platform.channel("console", "console")
    await asyncio.gather(*(platform.engine.handle(console.inbound(u, line)) for u in users))
    await platform.drain()


async def test_200_concurrent_spins_against_50_codes(make_platform, tmp_path: Path,
                                                     db_url: str) -> None:
    flows = tmp_path / "flows"
    flows.mkdir()
    (flows / "wheel.yaml").write_text(WHEEL)
    platform = await make_platform(flows_dir=flows, database_url=db_url)
    await import_codes(platform.db, "roulette-10", [f"R10-{n:03}" for n in range(50)],
                       platform.clock.now())
    users = [f"p{n}" for n in range(200)]
    await everyone(platform, users, "spin")
    await everyone(platform, users, "Spin!")
    await everyone(platform, users, "Get my code")
    texts = [m.text for _, m in platform.channel("console", "console").sent]
    codes = [t.removeprefix("Your code: ")[:7] for t in texts if t.startswith("Your code")]
    assert len(codes) <= 50 and len(set(codes)) == len(codes)
    out = texts.count("Sorry, we are out of prizes. Thank you for playing!")
    assert len(codes) + out == 200
    assert len(codes) == 50  # every code found a winner


async def test_three_spins_then_a_referral_earns_one_more(make_platform) -> None:
    platform = await make_platform()
    chat = Chat(platform)
    assert (await chat.say("spin"))[0].text.startswith("Spin the wheel")
    # No codes loaded: every prize with a pool is out of stock, so each spin loses.
    for _ in range(3):
        assert (await chat.say("1"))[0].text == "Not this time. Try again!"
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
    await chat.say("spin")
    assert (await chat.say("1"))[0].text == "Not this time. Try again!"
    assert (await chat.say("1"))[0].text.startswith("You have used all your spins.")
    async with platform.db.session() as session:
        assert await session.scalar(select(func.count()).select_from(Referral)) == 1
        assert await session.scalar(select(GameSpin.spins)) == 4


class LowestPoint:
    """A wheel that always stops at its first sector (the first prize in stock)."""

    def uniform(self, low: float, high: float) -> float:
        return low


async def test_winning_a_code_with_the_shipped_wheel(make_platform) -> None:
    platform = await make_platform()
    platform.engine.random = LowestPoint()
    await import_codes(platform.db, "roulette-25", ["BIG-25"], platform.clock.now())
    chat = Chat(platform)
    await chat.say("roulette")
    [won] = await chat.say("Spin!")  # 10% has no codes: the first prize in stock is 25%
    assert won.text == "You won 25% off! Tap the button to get your code."
    assert (await chat.say("Get my code"))[0].text == "Your code: BIG-25. Use it at checkout."
    await chat.say("Spin again")  # the 25% pool is empty now; the wheel stops at "nothing"
    assert chat.platform.channel("console", "console").sent[-1][1].text == (
        "Not this time. Try again!")

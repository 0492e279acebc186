"""Promo code pools: imported once, drawn atomically, never handed out twice."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from sqlalchemy import func, select

from bot_platform.models import PromoCode
from bot_platform.promo import import_codes
from tests.support.platform import ROOT

GIFT_FLOW = textwrap.dedent("""
    flow: gift
    triggers: [{on: start}]
    start: draw
    states:
      draw:
        actions: [{promo_code: {pool: spring, attribute: code}}]
        branch:
          - when: {attribute: code, op: exists}
            goto: won
          - goto: none
      won: {say: gift-won, end: true}
      none: {say: gift-none, end: true}
""")


@pytest.fixture
def gift_dirs(tmp_path: Path) -> dict[str, Path]:
    flows, locales = tmp_path / "flows", tmp_path / "locales" / "en"
    flows.mkdir()
    locales.mkdir(parents=True)
    (flows / "gift.yaml").write_text(GIFT_FLOW)
    (locales / "gift.ftl").write_text(
        "gift-won = Your code: { $code }\ngift-none = Sorry, out of prizes.\n")
    return {"flows_dir": flows, "locales_dir": tmp_path / "locales"}


async def test_200_concurrent_draws_against_50_codes(make_platform, gift_dirs, db_url) -> None:
    platform = await make_platform(database_url=db_url, **gift_dirs)
    added = await import_codes(platform.db, "spring", [f"SPRING-{n:03}" for n in range(50)],
                               platform.clock.now())
    assert added == 50
    console = platform.channel("console", "console")
    await asyncio.gather(*(platform.engine.handle(console.inbound(f"u{n}", "/start"))
                           for n in range(200)))
    await platform.drain()
    texts = [m.text for _, m in console.sent]
    won = [t.removeprefix("Your code: ") for t in texts if t.startswith("Your code")]
    assert len(won) == 50 and len(set(won)) == 50
    assert texts.count("Sorry, out of prizes.") == 150
    async with platform.db.session() as session:
        issued = await session.scalar(select(func.count()).where(
            PromoCode.issued_at.is_not(None)))
        assert issued == 50


async def test_a_contact_keeps_its_code(make_platform, gift_dirs) -> None:
    platform = await make_platform(**gift_dirs)
    await import_codes(platform.db, "spring", ["A1", "A2", "A1"], platform.clock.now())
    console = platform.channel("console", "console")
    for _ in range(3):
        await platform.engine.handle(console.inbound("u1", "/start"))
    await platform.drain()
    assert [m.text for _, m in console.sent] == ["Your code: A1"] * 3


@pytest.mark.slow
def test_cli_imports_codes(tmp_path: Path) -> None:
    env = {**os.environ, "BOTP_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/c.sqlite3"}
    file = tmp_path / "codes.txt"
    file.write_text("# spring codes\nS1\nS2\n\nS2\n")
    run = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "bot_platform.cli", "codes", *a], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=60, check=False)
    first = run("import", "spring", str(file))
    assert first.stdout.splitlines() == ["2 new code(s) in pool 'spring'",
                                         "pool 'spring': 2 code(s), 2 free"]
    again = run("import", "spring", str(file))
    assert again.stdout.splitlines()[0] == "0 new code(s) in pool 'spring'"

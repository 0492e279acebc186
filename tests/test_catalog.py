"""Catalog import, recommendations (rules and co-purchases) and tracked links."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from sqlalchemy import select

from bot_platform.catalog import parse_products, upsert_products
from bot_platform.events import EventIn, ingest
from bot_platform.models import Subscriber, TrackedLink
from tests.support.platform import ROOT

CSV = textwrap.dedent("""\
    sku,title,url,image_url,price,currency,category,tags,in_stock
    c1,Gentle cleanser,https://shop.example.com/c1,https://img.example.com/c1.jpg,12.5,EUR,skincare,dry|sensitive,yes
    c2,Rich cream,https://shop.example.com/c2,,30,EUR,skincare,dry,yes
    c3,Oil-free gel,https://shop.example.com/c3,,25,EUR,skincare,oily,yes
    c4,Dry-skin mask,https://shop.example.com/c4,,18,EUR,skincare,dry,no
    c5,Lip balm,https://shop.example.com/c5,,5,EUR,lips,dry,yes
    c6,Sun cream,https://shop.example.com/c6,,20,EUR,skincare,,yes
""")

FLOW = textwrap.dedent("""
    flow: recs
    triggers: [{on: keyword, keywords: [recommend]}]
    start: show
    states:
      show:
        actions:
          - recommend: {limit: 3, category: skincare, tags_from: [skin], say: recs-intro,
                        button: recs-buy, empty: recs-none}
        end: true
""")


@pytest.fixture
async def shop(make_platform, tmp_path: Path):
    flows, locales = tmp_path / "flows", tmp_path / "locales" / "en"
    flows.mkdir()
    locales.mkdir(parents=True)
    (flows / "recs.yaml").write_text(FLOW)
    (locales / "recs.ftl").write_text(
        "recs-intro = Picked for you:\nrecs-buy = Buy\nrecs-none = Nothing new for you.\n"
        "common-fallback = ?\n")
    platform = await make_platform(flows_dir=flows, locales_dir=tmp_path / "locales",
                                   public_url="https://bots.example.com")
    products, errors = parse_products(CSV, "catalog.csv")
    assert errors == []
    await upsert_products(platform.db, products, platform.clock.now())
    return platform


def titles(messages: list) -> list[str]:
    """The console has no carousel: each card arrives as an image message."""
    return [m.text.split("\n")[0] for m in messages[1:]]


async def ask(platform, user: str, skin: str | None = None) -> list:
    console = platform.channel("console", "console")
    before = len(console.sent)
    await platform.engine.handle(console.inbound(user, "hi"))
    if skin:
        async with platform.db.session() as session:
            subscriber = await session.scalar(select(Subscriber).where(
                Subscriber.user_id == user))
            subscriber.attributes = {**subscriber.attributes, "skin": skin}
    await platform.engine.handle(console.inbound(user, "recommend"))
    await platform.drain()
    return [m for u, m in console.sent[before:] if u == user and m.text != "?"]


async def test_rules_pick_in_stock_products_matching_the_quiz_result(shop) -> None:
    messages = await ask(shop, "u1", skin="dry")
    assert messages[0].text == "Picked for you:"
    assert titles(messages) == ["Gentle cleanser", "Rich cream"]
    first = messages[1]
    assert (first.text, first.image_url) == ("Gentle cleanser\n12.50 EUR",
                                             "https://img.example.com/c1.jpg")
    assert first.buttons[0].title == "Buy"
    assert first.buttons[0].url.startswith("https://bots.example.com/r/")


async def test_co_purchases_first_and_bought_products_never(shop) -> None:
    engine = shop.engine
    await ask(shop, "a")  # creates subscribers a and b
    await ask(shop, "b")
    for user, skus in (("a", ["c1", "c3"]), ("a", ["c6"]), ("b", ["c1"])):
        await ingest(engine, EventIn(name="order_placed", channel="console", bot_id="console",
                                     user_id=user, data={"items": [{"sku": s} for s in skus]}))
    shown = titles(await ask(shop, "b", skin="dry"))
    # b bought c1; a (who also bought c1) bought c3 and c6: those come first.
    assert "Gentle cleanser" not in shown
    assert set(shown[:2]) == {"Oil-free gel", "Sun cream"}
    assert shown[2] == "Rich cream"  # then the rule match
    assert "Dry-skin mask" not in shown  # out of stock


async def test_nothing_to_recommend_sends_the_empty_message(shop) -> None:
    for user in ("z",):
        await ask(shop, user)
    await ingest(shop.engine, EventIn(
        name="order_placed", channel="console", bot_id="console", user_id="z",
        data={"skus": ["c1", "c2", "c3", "c6"]}))
    [message] = await ask(shop, "z")
    assert message.text == "Nothing new for you."


async def test_tracked_link_counts_clicks_and_redirects_with_utm(shop) -> None:
    messages = await ask(shop, "u2", skin="dry")
    token = messages[1].buttons[0].url.rsplit("/", 1)[1]
    async with shop.http_client() as client:
        response = await client.get(f"/r/{token}")
        missing = await client.get("/r/nope")
    assert response.status_code == 302
    location = response.headers["location"]
    assert location.startswith("https://shop.example.com/c1?")
    assert "utm_source=botp" in location and "utm_medium=console" in location
    assert f"botp_click={token}" in location and "utm_campaign=recs" in location
    assert missing.status_code == 404
    async with shop.db.session() as session:
        link = await session.get(TrackedLink, token)
        assert (link.clicks, link.sku) == (1, "c1")


def test_bad_rows_are_reported_with_their_number() -> None:
    products, errors = parse_products(
        "sku,title,url\nok,Fine,https://x.example\n,No sku,https://x.example\nb,Bad,ftp://x\n",
        "c.csv")
    assert [p.sku for p in products] == ["ok"]
    assert errors[0].startswith("c.csv: row 2: sku:")
    assert errors[1].startswith("c.csv: row 3: url:")


@pytest.mark.slow
def test_cli_imports_a_catalog(tmp_path: Path) -> None:
    env = {**os.environ, "BOTP_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/k.sqlite3"}
    file = tmp_path / "catalog.csv"
    file.write_text(CSV)
    result = subprocess.run([sys.executable, "-m", "bot_platform.cli", "catalog", "import",
                             str(file)], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "6 product(s) imported, 0 row(s) rejected"

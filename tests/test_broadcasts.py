"""Broadcasts: snapshot, A/B variants, exactly one message per eligible recipient, pause,
resume, a dead worker's batch, cancel, and figures that add up."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select, update

from bot_platform import broadcasts
from bot_platform.apikeys import create_key
from bot_platform.events import EventIn, ingest
from bot_platform.models import BroadcastRecipient, Conversation, Job, Subscriber
from tests.support.engine import Chat

MESSAGE = {"en": {"text": "Spring sale: 20% off everything!",
                  "buttons": [{"title": "Shop now", "url": "https://shop.example.com/sale"}]},
           "uk": {"text": "Весняний розпродаж: -20% на все!"}}


@pytest.fixture
async def audience(make_platform):
    platform = await make_platform(public_url="https://bots.example.com")
    for n in range(40):
        await Chat(platform, user=f"c{n}").say("/start")
    await platform.drain()
    platform.channel("console", "console").sent.clear()
    _, key = await create_key(platform.db, name="m", role="marketer", now=platform.clock.now())
    client = platform.http_client()
    client.headers["Authorization"] = f"Bearer {key}"
    yield platform, client
    await client.aclose()


def received(platform) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for user, message in platform.channel("console", "console").sent:
        out.setdefault(user, []).append(message.text)
    return out


async def create(client, **extra) -> int:
    body = {"name": "spring", "filter": {"channel": "console"},
            "variants": [{"name": "A", "percent": 50, "messages": MESSAGE},
                         {"name": "B", "percent": 50, "messages": {
                             "en": {"text": "B: spring sale, 20% off"}}}], **extra}
    response = await client.post("/api/broadcasts", json=body)
    assert response.status_code == 201, response.text
    return response.json()["id"]


async def test_every_eligible_recipient_gets_exactly_one_and_figures_add_up(audience) -> None:
    platform, client = audience
    async with platform.db.session() as session:
        ids = (await session.scalars(select(Subscriber.id).order_by(Subscriber.id))).all()
        await session.execute(update(Subscriber).where(Subscriber.id == ids[0]).values(
            status="unsubscribed"))
        session.add(Conversation(subscriber_id=ids[1], status="waiting", reason="x", data={},
                                 created_at=platform.clock.now(),
                                 updated_at=platform.clock.now()))
    broadcast_id = await create(client)
    assert (await client.post(f"/api/broadcasts/{broadcast_id}/start")).json()[
        "status"] == "running"
    await platform.drain()
    got = received(platform)
    assert len(got) == 38 and all(len(texts) == 1 for texts in got.values())
    assert {"c0", "c1"}.isdisjoint(got)
    figures = (await client.get(f"/api/broadcasts/{broadcast_id}")).json()
    assert figures["status"] == "completed"
    stats = figures["stats"]
    assert stats["A"]["targeted"] + stats["B"]["targeted"] == 40
    assert 10 <= stats["A"]["targeted"] <= 30  # an even split, by hash
    skipped = {k: stats["A"]["skipped"].get(k, 0) + stats["B"]["skipped"].get(k, 0)
               for k in ("unsubscribed", "in_conversation")}
    assert skipped == {"unsubscribed": 1, "in_conversation": 1}
    assert stats["A"]["sent"] + stats["B"]["sent"] == 38
    for variant in ("A", "B"):
        row = stats[variant]
        assert row["targeted"] == row["queued"] + sum(row["skipped"].values())
    texts = {t for texts in got.values() for t in texts}
    assert texts == {"Spring sale: 20% off everything!", "B: spring sale, 20% off"}


async def test_clicks_and_conversions_are_counted(audience) -> None:
    platform, client = audience
    broadcast_id = await create(client, variants=[{"name": "A", "percent": 100,
                                                   "messages": MESSAGE}])
    await client.post(f"/api/broadcasts/{broadcast_id}/start")
    await platform.drain()
    [(user, message), *_] = platform.channel("console", "console").sent
    link = message.buttons[0].url
    assert link.startswith("https://bots.example.com/r/")
    assert (await client.get(link.removeprefix("https://bots.example.com"))).status_code == 302
    platform.clock.advance(timedelta(days=1))
    await ingest(platform.engine, EventIn(name="order_placed", channel="console",
                                          bot_id="console", user_id=user))
    stats = (await client.get(f"/api/broadcasts/{broadcast_id}")).json()["stats"]["A"]
    assert (stats["clicked"], stats["converted"]) == (1, 1)


async def test_pause_resume_and_a_dead_workers_batch(audience, monkeypatch) -> None:
    platform, client = audience
    monkeypatch.setattr(broadcasts, "BATCH", 10)
    broadcast_id = await create(client)
    await client.post(f"/api/broadcasts/{broadcast_id}/start")
    await platform.worker.scheduler.run_once()  # the first batch of 10 is queued
    assert (await client.post(f"/api/broadcasts/{broadcast_id}/pause")).json()[
        "status"] == "paused"
    await platform.drain()
    assert len(received(platform)) == 0  # queued rows are held while paused
    await client.post(f"/api/broadcasts/{broadcast_id}/resume")
    # A worker claims the next batch and dies before running it.
    claimed = await platform.worker.scheduler.claim(1)
    assert claimed
    platform.clock.advance(timedelta(seconds=platform.settings.worker.lease_seconds + 1))
    await platform.drain()
    got = received(platform)
    assert len(got) == 40 and all(len(texts) == 1 for texts in got.values())
    async with platform.db.session() as session:
        results = (await session.scalars(select(Job.result).where(
            Job.kind == broadcasts.SEND_KIND))).all()
    assert "paused" in results


async def test_cancel_and_scheduling_and_bad_requests(audience) -> None:
    platform, client = audience
    later = (platform.clock.now() + timedelta(hours=3)).isoformat()
    broadcast_id = await create(client, scheduled_at=later)
    assert (await client.post(f"/api/broadcasts/{broadcast_id}/start")).json()[
        "status"] == "scheduled"
    await platform.drain()
    assert received(platform) == {}
    platform.clock.advance(timedelta(hours=3))
    await platform.drain()
    assert len(received(platform)) == 40
    assert (await client.post(f"/api/broadcasts/{broadcast_id}/start")).status_code == 409

    other = await create(client)
    await client.post(f"/api/broadcasts/{other}/cancel")
    await platform.drain()
    assert (await client.post(f"/api/broadcasts/{other}/start")).status_code == 409
    bad = await client.post("/api/broadcasts", json={
        "name": "x", "filter": {"tagg": "v"}, "variants": [
            {"name": "A", "percent": 60, "messages": MESSAGE}]})
    assert bad.status_code == 422


async def test_flow_variants_and_local_time(audience) -> None:
    platform, client = audience
    async with platform.db.session() as session:
        rows = (await session.scalars(select(Subscriber).order_by(Subscriber.id))).all()
        rows[0].attributes = {"timezone": "Europe/Kyiv"}  # 10:00 there is 08:00 UTC
    # 09:00 UTC now: 10:00 comes in an hour for most, tomorrow morning for Kyiv.
    broadcast_id = await create(client, filter={"any": [{"attribute": "timezone",
                                                         "op": "exists"},
                                                        {"tag": "new-subscriber"}]},
                                local_time="10:00",
                                variants=[{"name": "F", "percent": 100,
                                           "flow": "spring_promo"}])
    await client.post(f"/api/broadcasts/{broadcast_id}/start")
    await platform.drain()
    assert received(platform) == {}
    platform.clock.advance(timedelta(hours=1))
    await platform.drain()
    got = received(platform)
    assert len(got) == 39 and "c0" not in got
    assert all(t[0].startswith("Spring is here") for t in got.values())
    platform.clock.advance(timedelta(hours=22))  # 08:00 UTC next day = 10:00 in Kyiv
    await platform.drain()
    assert received(platform)["c0"][0].startswith("Spring is here")
    figures = (await client.get(f"/api/broadcasts/{broadcast_id}")).json()
    assert figures["status"] == "completed" and figures["stats"]["F"]["sent"] == 40
    bad = await client.post("/api/broadcasts", json={
        "name": "x", "filter": {"tag": "a"}, "variants": [
            {"name": "A", "percent": 100, "flow": "nope"}]})
    assert bad.status_code == 422



async def test_the_snapshot_streams_its_recipients_in_chunks(make_platform, db_url,
                                                              monkeypatch) -> None:
    """Recipients are read and inserted a chunk at a time (a process's memory does not
    grow with the segment): every one is there once, with its local moment."""
    monkeypatch.setattr(broadcasts, "SNAPSHOT_CHUNK", 3)
    platform = await make_platform(database_url=db_url)
    for n in range(8):
        await Chat(platform, user=f"s{n}").say("/start")
    async with platform.db.session() as session:
        rows = (await session.scalars(select(Subscriber).order_by(Subscriber.id))).all()
        rows[4].attributes = {"timezone": "Europe/Kyiv"}  # 10:00 there is 08:00 UTC
    _, key = await create_key(platform.db, name="m", role="marketer", now=platform.clock.now())
    client = platform.http_client()
    client.headers["Authorization"] = f"Bearer {key}"
    try:
        for local_time in (None, "10:00"):
            broadcast_id = await create(client, local_time=local_time)
            started = await client.post(f"/api/broadcasts/{broadcast_id}/start")
            assert started.json()["status"] == "running"
            async with platform.db.session() as session:
                found = (await session.execute(select(
                    BroadcastRecipient.subscriber_id, BroadcastRecipient.due_at).where(
                    BroadcastRecipient.broadcast_id == broadcast_id))).all()
            assert sorted(i for i, _ in found) == [row.id for row in rows]
            moments = {i: due for i, due in found}
            if local_time is None:
                assert set(moments.values()) == {None}
            else:  # 09:00 UTC now: 10:00 in an hour, in Kyiv tomorrow
                kyiv = moments.pop(rows[4].id)
                assert len(set(moments.values())) == 1 and None not in moments.values()
                assert kyiv is not None and kyiv != next(iter(moments.values()))
    finally:
        await client.aclose()

PICKS_FLOW = """
flow: picks
triggers: [{on: keyword, keywords: [picks]}]
start: ask
states:
  ask:
    say: picks-ask
    buttons:
      - label: picks-yes
        goto: show
  show:
    actions:
      - recommend: {limit: 2, category: skincare, say: picks-intro, button: picks-buy}
    end: true
"""
PRODUCTS = """sku,title,url,price,currency,category,tags,in_stock
c1,Gentle cleanser,https://shop.example.com/c1,12.5,EUR,skincare,dry,yes
c2,Rich cream,https://shop.example.com/c2,30,EUR,skincare,dry,yes
"""


async def test_a_flow_variants_recommendation_clicks_count_for_the_broadcast(
        make_platform, db_url, tmp_path) -> None:
    """The flow's links are made turns later (when the person answers), not by the
    broadcast's send job; clicks on them still count for the flow variant, and clicks on
    the same flow's links from before the start do not."""
    import shutil

    from bot_platform.catalog import parse_products, upsert_products
    from tests.support.platform import ROOT

    flows, locales = tmp_path / "flows", tmp_path / "locales"
    flows.mkdir()
    (flows / "picks.yaml").write_text(PICKS_FLOW)
    shutil.copytree(ROOT / "locales", locales)
    (locales / "en" / "picks.ftl").write_text(
        "picks-ask = Want our picks for you?\npicks-yes = Yes please\n"
        "picks-intro = Picked for you:\npicks-buy = Buy\n")
    platform = await make_platform(database_url=db_url, flows_dir=flows,
                                   locales_dir=locales, public_url="https://bots.example.com")
    products, errors = parse_products(PRODUCTS, "catalog.csv")
    assert errors == []
    await upsert_products(platform.db, products, platform.clock.now())
    chats = [Chat(platform, user=f"p{n}") for n in range(12)]
    for chat in chats:
        await chat.say("/start")
    _, key = await create_key(platform.db, name="m", role="marketer", now=platform.clock.now())
    client = platform.http_client()
    client.headers["Authorization"] = f"Bearer {key}"

    async def click(message) -> None:
        path = message.buttons[0].url.removeprefix("https://bots.example.com")
        assert path.startswith("/r/")
        assert (await client.get(path)).status_code == 302

    # Before the broadcast, p0 asks for picks itself and clicks one: not the broadcast's.
    await chats[0].say("picks")
    [earlier, *_] = [m for m in await chats[0].say("1") if m.buttons]
    await click(earlier)
    platform.clock.advance(timedelta(hours=1))

    broadcast_id = await create(client, variants=[
        {"name": "M", "percent": 50, "messages": MESSAGE},
        {"name": "F", "percent": 50, "flow": "picks"}])
    assert (await client.post(f"/api/broadcasts/{broadcast_id}/start")).status_code == 200
    await platform.drain()
    clickers: dict[str, set[str]] = {"M": set(), "F": set()}
    flow_people: set[str] = set()
    for chat in chats:
        [first, *_] = chat.new()
        if first.text.startswith("Want our picks"):
            flow_people.add(chat.user)
            platform.clock.advance(timedelta(minutes=5))
            cards = [m for m in await chat.say("1") if m.buttons]  # answered later
            assert len(cards) == 2
            # Most click (some twice); p0, in this variant by the hash, clicked before.
            if chat.user != "p0" and int(chat.user[1:]) % 3:
                await click(cards[0])
                await click(cards[-1])
                clickers["F"].add(chat.user)
        else:
            assert first.text.startswith("Spring sale") and first.buttons
            if int(chat.user[1:]) % 2:
                await click(first)
                clickers["M"].add(chat.user)
    assert clickers["F"] and clickers["M"]
    assert "p0" not in clickers["F"] and "p0" not in clickers["M"]
    assert "p0" in flow_people
    stats = (await client.get(f"/api/broadcasts/{broadcast_id}")).json()["stats"]
    assert stats["F"]["targeted"] + stats["M"]["targeted"] == 12
    assert (stats["F"]["clicked"], stats["M"]["clicked"]) == (
        len(clickers["F"]), len(clickers["M"]))
    await client.aclose()

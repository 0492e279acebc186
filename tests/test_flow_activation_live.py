"""A flow version uploaded with its texts and activated through one process's API runs in
every other process (web and worker) within a bounded wait, without a restart
(issue 14, item 7)."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from typing import Any

from sqlalchemy import select

from bot_platform.apikeys import create_key
from bot_platform.clock import ManualClock
from bot_platform.config import BotConfig
from bot_platform.models import FlowVersion
from tests.support.telegram import SECRET, TOKEN, message_update

AUTUMN = """
flow: autumn_promo
triggers:
  - on: ref
    ref: promo-autumn
start: hello
states:
  hello:
    say: autumn-hello
    after:
      delay: 1h
      goto: later
  later:
    say: autumn-later
    end: true
"""
TEXTS = {
    "en": "autumn-hello = Autumn is here, { $first_name }!\nautumn-later = Still there?\n",
    "uk": "autumn-hello = Осінь прийшла, { $first_name }!\nautumn-later = Ви ще тут?\n",
}


async def marketer(platform: Any) -> dict[str, str]:
    _, key = await create_key(platform.db, name="m", role="marketer", now=platform.clock.now())
    return {"Authorization": f"Bearer {key}"}


async def until(predicate: Any, seconds: float = 15.0) -> None:
    """Wait for another process's polling to catch up (bounded, never a fixed sleep)."""
    for _ in range(int(seconds / 0.05)):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("not picked up in time")


async def test_activation_through_one_api_runs_in_other_web_and_worker(
        make_platform, fake, db_url) -> None:
    telegram = BotConfig(id="shop", channel="telegram", token=TOKEN, secret=SECRET,
                         api_base=fake.url)
    api = await make_platform(database_url=db_url, flow_reload_seconds=0.1)
    web = await make_platform(bots=[telegram], database_url=db_url, flow_reload_seconds=0.1)
    clock = ManualClock()
    worker = await make_platform(bots=[telegram], database_url=db_url, clock=clock,
                                 flow_reload_seconds=0.1)
    headers = await marketer(api)
    async with api.http_client() as client:
        plain = await client.post("/api/flows", content=AUTUMN, headers={
            **headers, "Content-Type": "application/yaml"})
        assert plain.status_code == 422  # the texts are new: they must come with it
        assert "unknown catalog key 'autumn-hello'" in plain.text
        uploaded = await client.post("/api/flows/versions", headers=headers,
                                     json={"yaml": AUTUMN, "texts": TEXTS})
        assert uploaded.status_code == 201, uploaded.text
        version = uploaded.json()["version"]
        activated = await client.post(f"/api/flows/autumn_promo/versions/{version}/activate",
                                      headers=headers)
        assert activated.status_code == 200

    await until(lambda: "autumn_promo" in web.engine.flows.flows
                and "autumn_promo" in worker.engine.flows.flows)
    async with web.http_client() as client:
        response = await client.post(
            "/webhooks/telegram/shop", content=json.dumps(message_update(
                1, "/start promo-autumn")).encode(),
            headers={"Content-Type": "application/json",
                     "X-Telegram-Bot-Api-Secret-Token": SECRET})
    assert response.status_code == 200
    await web.drain()
    assert [m.params["text"] for m in fake.sent(1111)] == ["Осінь прийшла, Olena!"]

    # The timer of the new flow fires in the worker process, with the uploaded texts.
    clock.advance(timedelta(hours=2))
    await worker.drain()
    assert [m.params["text"] for m in fake.sent(1111)][1:] == ["Ви ще тут?"]


async def test_uploaded_texts_are_checked_like_files(make_platform) -> None:
    platform = await make_platform()
    headers = await marketer(platform)
    broken = {"en": "autumn-hello = Hi\nautumn-later = {\nautumn-hello = again\n",
              "uk": "autumn-hello = Привіт\n"}
    async with platform.http_client() as client:
        response = await client.post("/api/flows/versions", headers=headers,
                                     json={"yaml": AUTUMN, "texts": broken})
        only_uk = await client.post("/api/flows/versions", headers=headers,
                                    json={"yaml": AUTUMN, "texts": {"uk": TEXTS["uk"]}})
        bad_locale = await client.post("/api/flows/versions", headers=headers,
                                       json={"yaml": AUTUMN, "texts": {"../en": "a = b"}})
    assert response.status_code == 422
    problems = response.json()["detail"]
    syntax = [p for p in problems if "syntax error" in p["msg"]]
    assert [(p["loc"], p["line"]) for p in syntax] == [(["body", "texts", "en"], 2)]
    assert any("duplicate key 'autumn-hello'" in p["msg"] and p["line"] == 3
               for p in problems)
    # The default locale (en) lacks autumn-later: the broken entry does not count.
    assert any(p["loc"][:2] == ["body", "yaml"] and "autumn-later" in p["msg"]
               for p in problems)
    assert only_uk.status_code == 422
    assert "in the default locale 'en'" in only_uk.text
    assert bad_locale.status_code == 422
    async with platform.db.session() as session:
        assert (await session.scalars(select(FlowVersion))).all() == []


async def test_concurrent_activations_leave_one_active(make_platform, db_url) -> None:
    platforms = [await make_platform(database_url=db_url) for _ in range(2)]
    headers = await marketer(platforms[0])
    async with platforms[0].http_client() as client:
        for _ in range(4):
            assert (await client.post("/api/flows/versions", headers=headers, json={
                "yaml": AUTUMN, "texts": TEXTS})).status_code == 201

    async with platforms[0].http_client() as one, platforms[1].http_client() as two:
        statuses = [r.status_code for r in await asyncio.gather(*(
            (one, two)[i % 2].post(f"/api/flows/autumn_promo/versions/{1 + i % 4}/activate",
                                   headers=headers) for i in range(12)))]
    assert set(statuses) == {200}
    async with platforms[0].db.session() as session:
        active = (await session.scalars(select(FlowVersion.version).where(
            FlowVersion.active.is_(True)))).all()
    assert len(active) == 1

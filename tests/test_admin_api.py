"""The admin API: keys and roles (a matrix over every route), shop feeds, subscribers."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bot_platform.apikeys import create_key
from tests.support.engine import Chat
from tests.support.platform import ROOT

ROLES = ("admin", "marketer", "agent")


@pytest.fixture
async def api(make_platform):
    platform = await make_platform()
    keys = {}
    for role in ROLES:
        _, keys[role] = await create_key(platform.db, name=f"{role}-key", role=role,
                                         now=platform.clock.now())
    client = platform.http_client()
    yield platform, client, keys
    await client.aclose()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_every_route_declares_roles_and_each_role_gets_403_where_it_must(api) -> None:
    platform, client, keys = api
    operations = [(path, method.upper(), operation)
                  for path, item in platform.app().openapi()["paths"].items()
                  if path.startswith("/api") for method, operation in item.items()]
    assert len(operations) >= 12
    for route_path, method, operation in operations:
        allowed = set(operation.get("x-roles", []))
        assert allowed, f"{method} {route_path} declares no roles"
        path = re.sub(r"\{[^}]+\}", "999999", route_path)  # never an existing row
        path += "?max_seconds=0.1"  # (the live stream would otherwise run for an hour)
        anonymous = await client.request(method, path, json={})
        assert anonymous.status_code == 401, (method, path)
        for role in ROLES:
            response = await client.request(method, path, json={}, headers=auth(keys[role]))
            if role in allowed:
                assert response.status_code not in (401, 403), (method, path, role)
            else:
                assert response.status_code == 403, (method, path, role)


async def test_keys_are_shown_once_stored_hashed_and_revocable(api) -> None:
    _, client, keys = api
    created = await client.post("/api/keys", json={"name": "shop", "role": "marketer"},
                                headers=auth(keys["admin"]))
    assert created.status_code == 201
    secret = created.json()["key"]
    assert secret.startswith("botp_")
    listed = await client.get("/api/keys", headers=auth(keys["admin"]))
    assert secret not in listed.text and "key_hash" not in listed.text
    me = await client.get("/api/me", headers={"X-API-Key": secret})
    assert me.json()["role"] == "marketer"
    revoked = await client.delete(f"/api/keys/{created.json()['id']}",
                                  headers=auth(keys["admin"]))
    assert revoked.status_code == 204
    assert (await client.get("/api/me", headers=auth(secret))).status_code == 401
    wrong = secret[:-3] + "xyz"
    assert (await client.get("/api/me", headers=auth(wrong))).status_code == 401


async def test_shop_feeds_events_products_and_codes(api) -> None:
    platform, client, keys = api
    headers = auth(keys["marketer"])
    chat = Chat(platform)
    await chat.say("hello")
    event = {"name": "order_placed", "event_id": "o-1", "channel": "console",
             "bot_id": "console", "user_id": "u1", "data": {"skus": ["a"]}}
    first = await client.post("/api/events", json=event, headers=headers)
    again = await client.post("/api/events", json=event, headers=headers)
    assert (first.json()["status"], again.json()["status"]) == ("accepted", "duplicate")
    bad = await client.post("/api/events", json={"name": "x"}, headers=headers)
    assert bad.status_code == 422 and "name the customer" in bad.text
    batch = await client.post("/api/events/batch", headers=headers, json={"events": [
        {"name": "birthday", "email": "nobody@example.com"}, event]})
    assert [r["status"] for r in batch.json()] == ["unknown_customer", "duplicate"]

    products = await client.post("/api/catalog/products", headers=headers, json=[
        {"sku": "a", "title": "A", "url": "https://shop.example.com/a", "tags": "x|y"}])
    assert products.json() == {"imported": 1}
    codes = await client.post("/api/promo-pools/spring/codes", headers=headers,
                              json={"codes": ["S1", "S2", "S1"]})
    assert codes.json() == {"pool": "spring", "total": 2, "free": 2, "added": 2}
    assert (await client.get("/api/promo-pools/none", headers=headers)).status_code == 404


async def test_flow_upload_is_validated_with_the_validators_messages(api) -> None:
    _, client, keys = api
    headers = {**auth(keys["marketer"]), "Content-Type": "application/yaml"}
    good = (ROOT / "flows" / "spring_promo.yaml").read_text()
    assert (await client.post("/api/flows/validate", content=good, headers=headers)
            ).json() == {"valid": True, "issues": []}
    bad = good.replace("goto: code", "goto: cod").replace("- tag: spring-campaign",
                                                         "- start_flow: nope")
    result = (await client.post("/api/flows/validate", content=bad, headers=headers)).json()
    assert result["valid"] is False
    paths = {i["path"] for i in result["issues"]}
    assert "states.hello.buttons[0].goto" in paths
    assert "states.hello.actions[0].start_flow" not in paths  # reported once the rest is ok


async def test_subscribers_list_profile_update_export_and_forget(api) -> None:
    platform, client, keys = api
    for n in range(5):
        await Chat(platform, user=f"s{n}").say("/start")
    marketer, agent = auth(keys["marketer"]), auth(keys["agent"])
    page = (await client.get("/api/subscribers?limit=2", headers=agent)).json()
    assert [s["user_id"] for s in page["items"]] == ["s4", "s3"]
    rest = (await client.get(f"/api/subscribers?limit=10&cursor={page['next_cursor']}",
                             headers=agent)).json()
    assert [s["user_id"] for s in rest["items"]] == ["s2", "s1", "s0"]
    assert rest["next_cursor"] is None
    subscriber_id = page["items"][0]["id"]
    profile = (await client.get(f"/api/subscribers/{subscriber_id}", headers=agent)).json()
    assert profile["tags"] == ["new-subscriber"]
    assert profile["recent_messages"] is None  # no chat of theirs: the handoff rule
    admin = auth(keys["admin"])
    profile = (await client.get(f"/api/subscribers/{subscriber_id}", headers=admin)).json()
    assert profile["recent_messages"][-1]["text"].startswith("Hi Alex!")
    assert profile["flows"][0]["flow"] == "welcome"
    assert (await client.patch(f"/api/subscribers/{subscriber_id}", json={},
                               headers=agent)).status_code == 403
    updated = await client.patch(f"/api/subscribers/{subscriber_id}", headers=marketer, json={
        "add_tags": ["vip"], "remove_tags": ["new-subscriber"], "attributes": {"tier": "gold"}})
    assert updated.json()["tags"] == ["vip"] and updated.json()["attributes"]["tier"] == "gold"
    vip = (await client.get("/api/subscribers?tag=vip", headers=agent)).json()["items"]
    assert [s["id"] for s in vip] == [subscriber_id]

    exported = await client.get("/api/subscribers/export?format=csv", headers=marketer)
    rows = list(csv.DictReader(io.StringIO(exported.text)))
    assert len(rows) == 5 and rows[4]["tags"] == "vip"
    lines = (await client.get("/api/subscribers/export?format=json", headers=marketer)).text
    assert len([json.loads(line) for line in lines.splitlines()]) == 5

    assert (await client.delete(f"/api/subscribers/{subscriber_id}",
                                headers=marketer)).status_code == 204
    forgotten = (await client.get(f"/api/subscribers/{subscriber_id}", headers=admin)).json()
    assert forgotten["first_name"] is None and forgotten["attributes"] == {}
    assert forgotten["user_id"] == f"forgotten-{subscriber_id}"
    assert all(m["text"] is None for m in forgotten["recent_messages"])
    assert len(forgotten["recent_messages"]) > 0  # counts stay


def test_openapi_document_lists_the_admin_routes(tmp_path: Path) -> None:
    import asyncio

    from tests.support.platform import TestPlatform, make_settings

    async def document() -> dict:
        platform = TestPlatform(make_settings(f"sqlite+aiosqlite:///{tmp_path}/o.sqlite3"))
        await platform.db.create_all()
        await platform.start()
        try:
            return platform.app().openapi()
        finally:
            await platform.close()

    spec = asyncio.run(document())
    assert {"/api/keys", "/api/events", "/api/subscribers", "/api/subscribers/{subscriber_id}",
            "/api/flows/validate"} <= set(spec["paths"])
    assert spec["paths"]["/api/keys"]["post"]["x-roles"] == ["admin"]


@pytest.mark.slow
def test_cli_creates_the_first_admin_key(tmp_path: Path) -> None:
    env = {**os.environ, "BOTP_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/k.sqlite3"}
    result = subprocess.run([sys.executable, "-m", "bot_platform.cli", "keys", "create",
                             "--name", "founder"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"botp_[0-9a-f]{12}_[\w-]{32}", result.stdout.splitlines()[-1])


async def test_segment_preview_and_exact_error_paths(api) -> None:
    platform, client, keys = api
    for n in range(3):
        await Chat(platform, user=f"g{n}").say("/start")
    headers = auth(keys["marketer"])
    ok = await client.post("/api/segments/preview?sample=1", headers=headers, json={
        "filter": {"all": [{"tag": "new-subscriber"}, {"not": {"locale": "uk"}}]}})
    assert ok.json()["count"] == 3 and len(ok.json()["sample"]) == 1
    bad = await client.post("/api/segments/preview", headers=headers, json={
        "filter": {"all": [{"tag": "x"}, {"attribute": "age", "op": "gt", "value": "old"}]}})
    assert bad.status_code == 422
    detail = bad.json()["detail"]
    assert any(d["path"] == "filter.all[1]" and "needs a number" in d["message"]
               for d in detail), detail


async def test_flow_quiz_and_nps_figures(api) -> None:
    from datetime import timedelta

    platform, client, keys = api
    headers = auth(keys["marketer"])
    for n, (skin, score) in enumerate([("1", "10"), ("2", "9"), ("1", "3"), ("1", "7")]):
        chat = Chat(platform, user=f"q{n}")
        await chat.say("quiz")
        await chat.say(skin)
        await chat.say("feedback")
        await chat.say(score)
        platform.clock.advance(timedelta(days=3))
    quiz = (await client.get("/api/stats/flows/skin_quiz", headers=headers)).json()
    assert quiz["entered"] == 4 and quiz["completed"] == 0
    assert quiz["waiting_at"] == {"q_concern": 4}  # everybody stopped at question two
    assert quiz["answers"]["skin_type"] == {"dry": 3, "oily": 1}
    weeks = (await client.get("/api/stats/nps", headers=headers)).json()
    assert sum(w["responses"] for w in weeks) == 4
    total = {k: sum(w[k] for w in weeks) for k in ("promoters", "passives", "detractors")}
    assert total == {"promoters": 2, "passives": 1, "detractors": 1}
    assert (await client.get("/api/stats/flows/nope", headers=headers)).status_code == 404

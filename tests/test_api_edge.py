"""The edge makes input safe (issue 13, items 4, 7 and 8): bounded bodies and filters,
values both databases can store, one error shape, a safe CSV export, importers that
read what spreadsheets save and explain what they cannot read."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from pathlib import Path

from sqlalchemy import select

from bot_platform.apikeys import create_key
from bot_platform.cli import main
from bot_platform.config import BotConfig
from bot_platform.models import Contact, Message, Product, Subscriber
from tests.fakes.telegram_api import FakeTelegramServer

BIG = 2**63  # one past the largest BIGINT


async def _api(make_platform, db_url: str, **overrides):
    platform = await make_platform(database_url=db_url, **overrides)
    _, key = await create_key(platform.db, name="m", role="marketer", now=platform.clock.now())
    _, admin = await create_key(platform.db, name="a", role="admin", now=platform.clock.now())
    return platform, {"Authorization": f"Bearer {key}"}, {"Authorization": f"Bearer {admin}"}


def _is_validation_error(response) -> bool:
    """A 422 in the documented shape: ``{"detail": [{"loc", "msg", "type"}, ...]}``."""
    detail = response.json().get("detail")
    return response.status_code == 422 and isinstance(detail, list) and all(
        isinstance(d["loc"], list) and isinstance(d["msg"], str) and isinstance(d["type"], str)
        for d in detail)


async def _subscriber(platform, **values) -> int:
    now = platform.clock.now()
    async with platform.db.session() as session:
        contact = Contact(created_at=now)
        session.add(contact)
        await session.flush()
        row = Subscriber(contact_id=contact.id, channel="telegram", bot_id="shop",
                         user_id=values.pop("user_id", f"u{contact.id}"), status="subscribed",
                         attributes=values.pop("attributes", {}), created_at=now,
                         updated_at=now, **values)
        session.add(row)
        await session.flush()
        return row.id


async def test_a_huge_segment_filter_is_refused_before_compiling(make_platform) -> None:
    platform, marketer, _ = await _api(make_platform, None)
    # 67 KB: 14 x 100 attribute conditions (the audit's froze the loop for 9.7 s).
    wide = {"all": [{"any": [{"attribute": f"attr_{i}", "op": "gte", "value": 1000 + i}
                             for i in range(100)]} for _ in range(14)]}
    deep: dict = {"tag": "vip"}
    for _ in range(12):
        deep = {"not": deep}
    async with platform.http_client() as client:
        assert len(json.dumps({"filter": wide})) > 60_000

        async def health() -> int:
            return (await client.get("/healthz")).status_code

        results = await asyncio.gather(
            client.post("/api/segments/preview", headers=marketer, json={"filter": wide}),
            health(), health())
        too_large, *healthy = results
        assert healthy == [200, 200]
        assert _is_validation_error(too_large), too_large.text
        assert too_large.json()["detail"][0]["type"] == "filter_too_large"
        assert "at most 100 conditions" in too_large.json()["detail"][0]["msg"]
        too_deep = await client.post("/api/segments/preview", headers=marketer,
                                     json={"filter": deep})
        assert _is_validation_error(too_deep)
        assert too_deep.json()["detail"][0]["type"] == "filter_too_deep"
        # The same bound holds where a broadcast stores its filter.
        broadcast = await client.post("/api/broadcasts", headers=marketer, json={
            "name": "b", "filter": wide, "variants": [
                {"name": "a", "percent": 100, "messages": {"en": {"text": "hi"}}}]})
        assert _is_validation_error(broadcast)
        assert "at most 100 conditions" in broadcast.text
        # A body over 1 MiB is refused before it is read.
        huge = await client.post("/api/segments/preview", headers=marketer,
                                 content=b'{"filter": {"tag": "' + b"x" * 2_000_000 + b'"}}',
                                 )
        assert huge.status_code == 413
        # A filter within the bounds still works.
        ok = await client.post("/api/segments/preview", headers=marketer,
                               json={"filter": wide["all"][0]})
        assert ok.status_code == 200


async def test_values_the_database_cannot_store_are_422(make_platform, db_url) -> None:
    platform, marketer, admin = await _api(make_platform, db_url)
    subscriber_id = await _subscriber(platform)
    s = f"/api/subscribers/{subscriber_id}"
    event = {"name": "order_placed", "subscriber_id": subscriber_id}
    product = {"sku": "a", "title": "A", "url": "https://shop.example/a"}
    refused = [
        ("GET", f"/api/subscribers?cursor={BIG}", None, marketer),
        ("GET", "/api/subscribers?q=a%00b", None, marketer),
        ("GET", "/api/subscribers?tag=" + "t" * 65, None, marketer),
        ("GET", "/api/subscribers/export?tag=a%00", None, marketer),
        ("PATCH", f"/api/subscribers/{BIG * 2}", {"add_tags": ["x"]}, marketer),
        ("PATCH", s, {"add_tags": ["t" * 65]}, marketer),
        ("PATCH", s, {"add_tags": ["a\x00b"]}, marketer),
        ("PATCH", s, {"attributes": {"big": 10**30}}, marketer),
        ("PATCH", s, {"attributes": {"huge": 10**400}}, marketer),
        ("PATCH", s, {"attributes": {"note": "a\x00b"}}, marketer),
        ("PATCH", s, {"attributes": {"note": "\ud800"}}, marketer),
        ("POST", "/api/segments/preview",
         {"filter": {"last_active": {"within_days": 100_000_000}}}, marketer),
        ("POST", "/api/segments/preview",
         {"filter": {"event": {"name": "x", "within_days": 100_000_000}}}, marketer),
        ("POST", "/api/segments/preview",
         {"filter": {"attribute": "n", "op": "gt", "value": 10**30}}, marketer),
        ("POST", "/api/segments/preview", {"filter": {"tag": "a\x00"}}, marketer),
        ("POST", "/api/events", {**event, "subscriber_id": BIG}, marketer),
        ("POST", "/api/events", {**event, "data": {"total": 10**400}}, marketer),
        ("POST", "/api/events", {**event, "data": {"note": "a\x00"}}, marketer),
        ("POST", "/api/events", {**event, "data": {"note": "\ud800"}}, marketer),
        ("POST", "/api/catalog/products", [{**product, "currency": "DOLLARS!!"}], marketer),
        ("POST", "/api/catalog/products", [{**product, "title": "a\x00"}], marketer),
        ("POST", "/api/catalog/products", [{**product, "tags": ["t" * 65]}], marketer),
        ("POST", "/api/promo-pools/p/codes", {"codes": ["c\x00"]}, marketer),
        ("POST", f"/api/flows/welcome/versions/{BIG}/activate", None, marketer),
        ("POST", "/api/keys", {"name": "k\x00", "role": "agent"}, admin),
        ("DELETE", f"/api/keys/{BIG}", None, admin),
    ]
    async with platform.http_client() as client:
        for method, path, body, headers in refused:
            content = None if body is None else json.dumps(body).encode()  # (escapes \ud800)
            response = await client.request(method, path, content=content, headers={
                **headers, "Content-Type": "application/json"})
            assert _is_validation_error(response), (method, path, body, response.status_code,
                                                    response.text)
        stored = await client.patch(s, headers=marketer, json={
            "add_tags": ["t" * 64], "attributes": {"big": BIG - 1, "ratio": 1e300}})
        assert stored.status_code == 200, stored.text
        listed = await client.get("/api/subscribers?tag=" + "t" * 64, headers=marketer)
        assert [i["attributes"] for i in listed.json()["items"]] == [
            {"big": BIG - 1, "ratio": 1e300}]


async def test_webhook_text_is_stored_storable_and_cut_to_its_column(make_platform,
                                                                     db_url) -> None:
    async with FakeTelegramServer() as fake:
        platform = await make_platform(database_url=db_url, bots=[BotConfig(
            id="shop", channel="telegram", token="1:x", secret="s", api_base=fake.url)])
        name = "N\x00" + "a" * 300
        update = {"update_id": 1, "message": {
            "message_id": 1, "date": 1767225600, "text": "hi\x00 there",
            "from": {"id": 5, "is_bot": False, "first_name": name, "last_name": "L" * 400},
            "chat": {"id": 5, "type": "private"}}}
        async with platform.http_client() as client:
            response = await client.post(
                "/webhooks/telegram/shop", content=json.dumps(update).encode(),
                headers={"Content-Type": "application/json",
                         "X-Telegram-Bot-Api-Secret-Token": "s"})
        assert response.status_code == 200
        async with platform.db.session() as session:
            subscriber = await session.scalar(select(Subscriber))
            texts = (await session.scalars(select(Message.text).where(
                Message.direction == "in"))).all()
        assert subscriber.first_name == ("N" + "a" * 300)[:255]
        assert subscriber.last_name == "L" * 255
        assert texts == ["hi there"]


async def test_duplicate_skus_in_one_upload_write_the_last_row(make_platform, db_url) -> None:
    platform, marketer, _ = await _api(make_platform, db_url)
    rows = [{"sku": "a", "title": title, "url": "https://shop.example/a"}
            for title in ("First", "Second")]
    async with platform.http_client() as client:
        response = await client.post("/api/catalog/products", headers=marketer, json=rows)
        assert response.status_code == 200, response.text
        assert response.json() == {"imported": 1}
        # Concurrent uploads of the same new sku: each succeeds, one row remains.
        fresh = [{"sku": "b", "title": f"T{n}", "url": "https://shop.example/b"}
                 for n in range(4)]
        answers = await asyncio.gather(*[client.post(
            "/api/catalog/products", headers=marketer, json=[row]) for row in fresh])
        assert [a.status_code for a in answers] == [200] * 4
    async with platform.db.session() as session:
        products = (await session.scalars(select(Product).order_by(Product.sku))).all()
    assert [p.sku for p in products] == ["a", "b"]
    assert products[0].title == "Second"


async def test_stored_surrogates_and_formulas_are_shown_safely(make_platform, db_url) -> None:
    platform, marketer, _ = await _api(make_platform, db_url)
    first = await _subscriber(platform, first_name="=HYPERLINK(\"http://evil\",\"x\")",
                              last_name="+1-555", username="@boss")
    # A lone surrogate that reached the attributes before the edge checked them (JSON
    # escapes it, so both databases hold it).
    broken = await _subscriber(platform, attributes={"note": "bad \ud800 text"})
    last = await _subscriber(platform, first_name="Plain")
    async with platform.http_client() as client:
        page = await client.get("/api/subscribers", headers=marketer)
        assert page.status_code == 200, page.text
        items = {i["id"]: i for i in page.json()["items"]}
        assert items[broken]["attributes"] == {"note": "bad \ufffd text"}
        exported = await client.get("/api/subscribers/export", headers=marketer)
        lines = await client.get("/api/subscribers/export?format=json", headers=marketer)
    assert exported.status_code == 200
    rows = list(csv.DictReader(io.StringIO(exported.text)))
    assert [int(r["id"]) for r in rows] == [first, broken, last]  # not cut short
    assert rows[0]["first_name"] == "'=HYPERLINK(\"http://evil\",\"x\")"
    assert (rows[0]["last_name"], rows[0]["username"]) == ("'+1-555", "'@boss")
    assert rows[2]["first_name"] == "Plain"
    assert [json.loads(line)["id"] for line in lines.text.splitlines()] == [first, broken, last]


async def test_every_operation_documents_its_errors_in_one_shape(make_platform) -> None:
    platform, marketer, _ = await _api(make_platform, None)
    document = platform.app().openapi()
    for path, item in document["paths"].items():
        if not path.startswith("/api"):
            continue
        for method, operation in item.items():
            responses = operation["responses"]
            for status in ("401", "403", "404", "409", "413", "422"):
                assert status in responses, (method, path, status)
            schema = responses["422"]["content"]["application/json"]["schema"]
            assert schema["$ref"].endswith("/ValidationErrorPublic"), (method, path)
    async with platform.http_client() as client:
        # A 422 raised with a sentence (an unknown flow) comes out in the list shape.
        unknown = await client.post("/api/broadcasts", headers=marketer, json={
            "name": "b", "filter": {"tag": "x"},
            "variants": [{"name": "a", "percent": 100, "flow": "no-such-flow"}]})
        assert _is_validation_error(unknown), unknown.text
        assert "no-such-flow" in unknown.json()["detail"][0]["msg"]
        anonymous = await client.get("/api/subscribers")
        assert anonymous.status_code == 401 and isinstance(anonymous.json()["detail"], str)


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_importers_read_a_bom_and_explain_what_they_cannot_read(
        tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("BOTP_DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path}/i.sqlite3")
    catalog = tmp_path / "catalog.csv"
    catalog.write_text("\ufeffsku,title,url\na,A,https://shop.example/a\n", encoding="utf-8")
    assert _cli(capsys, "catalog", "import", str(catalog))[:2] == (
        0, "1 product(s) imported, 0 row(s) rejected\n")
    events = tmp_path / "events.jsonl"
    events.write_text('\ufeff{"name": "order_placed", "event_id": "o-1", "email": "a@b.co"}\n',
                      encoding="utf-8")
    assert _cli(capsys, "events", "import", str(events))[:2] == (
        0, "order_placed o-1: unknown_customer\n")

    oversized = tmp_path / "big.csv"
    oversized.write_text("sku,title,url\na," + "x" * 200_000 + ",https://shop.example/a\n")
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    deep_events = tmp_path / "deep.jsonl"
    deep_events.write_text('{"name": "x", "email": "a@b.co", "data": '
                           + '{"a": ' * 5000 + "1" + "}" * 5000 + "}\n")
    for command, file, reason in [("catalog", oversized, "field larger than field limit"),
                                  ("catalog", deep, "nested too deeply"),
                                  ("events", deep_events, "line 1:")]:
        code, _, err = _cli(capsys, command, "import", str(file))
        assert code in (1, 2), err
        assert len(err.strip().splitlines()) == 1 and reason in err, err
        assert "Traceback" not in err


def test_a_deeply_nested_attributes_cell_is_a_row_error() -> None:
    from bot_platform.catalog import parse_products

    cell = '"' + ('{""a"": ' * 3000) + "1" + ("}" * 3000) + '"'
    products, errors = parse_products(
        f"sku,title,url,attributes\na,A,https://x.example,{cell}\nb,B,https://x.example,\n",
        "c.csv")
    assert [p.sku for p in products] == ["b"] and len(errors) == 1
    assert "nested too deeply" in errors[0]

"""The right to be forgotten, proven on the whole database: a person who talked to the bot
on Telegram (webhook -> engine -> delivery -> fake Telegram), gave an email and a phone,
played the wheel, was escalated, got agent replies and notes, shop events and a tracked
link is deleted through the API; then every table of the database (read from the
database's own catalog, not from our models) is searched for each of their values."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select, text

from bot_platform import privacy
from bot_platform.apikeys import create_key
from bot_platform.config import BotConfig
from bot_platform.models import Base, KeyValue, Message, Outbox, ProcessedEvent, Subscriber
from bot_platform.promo import import_codes
from tests.fakes.telegram_api import FakeTelegramServer
from tests.support.telegram import SECRET, TOKEN, post

UID = 730012345678
NAME, LAST, USERNAME = "Zofia", "Kwiatkowska", "zofia_kw"
EMAIL, PHONE, CARD = "zofia.kw@example.org", "+48601234567", "LOYAL-5550123"
NEEDLES = (str(UID), NAME, LAST, USERNAME, EMAIL, PHONE, PHONE.lstrip("+"), CARD)


def _user(uid: int, first: str, last: str | None, username: str) -> dict[str, Any]:
    return {"id": uid, "is_bot": False, "first_name": first, "language_code": "en",
            "username": username, **({"last_name": last} if last else {})}


def _message(update_id: int, uid: int, text: str | None = None, **extra: Any) -> dict:
    user = _user(uid, NAME, LAST, USERNAME) if uid == UID else _user(uid, "Marek", None,
                                                                      "marek")
    body: dict[str, Any] = {"message_id": update_id, "from": user, "date": 1767225600,
                            "chat": {"id": uid, "type": "private"}, **extra}
    if text is not None:
        body["text"] = text
        if text.startswith("/"):
            body["entities"] = [{"offset": 0, "length": 6, "type": "bot_command"}]
    return {"update_id": update_id, "message": body}


def _press(update_id: int, data: str) -> dict:
    return {"update_id": update_id, "callback_query": {
        "id": f"cb-{update_id}", "from": _user(UID, NAME, LAST, USERNAME),
        "chat_instance": "-77", "data": data,
        "message": {"message_id": 1, "date": 1767225600,
                    "chat": {"id": UID, "type": "private"}, "text": "..."}}}


def _buttons(fake: FakeTelegramServer) -> list[str]:
    markup = fake.sent(UID)[-1].params.get("reply_markup") or {}
    return [b["callback_data"] for row in markup.get("inline_keyboard", [])
            for b in row if "callback_data" in b]


async def dump_every_table(platform: Any) -> dict[str, list[str]]:
    """Every row of every table in the database's catalog, as text."""
    async with platform.db.session() as session:
        if platform.db.is_sqlite:
            names = (await session.scalars(text(
                "SELECT name FROM sqlite_master WHERE type = 'table'"))).all()
        else:
            names = (await session.scalars(text(
                "SELECT table_name FROM information_schema.tables "
                "WHERE table_schema = current_schema()"))).all()
        tables = {}
        for name in names:
            rows = (await session.execute(text(f'SELECT * FROM "{name}"'))).all()
            tables[name] = [json.dumps([str(v) for v in row], ensure_ascii=False)
                            for row in rows]
    assert "outbox" in tables and "conversation_notes" in tables
    return tables


def hits(tables: dict[str, list[str]], needles: tuple[str, ...]) -> list[tuple[str, str]]:
    return [(name, needle) for name, rows in tables.items() for row in rows
            for needle in needles if needle.lower() in row.lower()]


def test_every_table_is_in_the_inventory_or_declared_impersonal() -> None:
    held = {h.model.__table__.name for h in privacy.HOLDINGS}
    assert not held & set(privacy.NOT_PERSONAL)
    assert held | set(privacy.NOT_PERSONAL) == set(Base.metadata.tables)


async def test_delete_leaves_no_value_of_the_person_in_any_table(make_platform,
                                                                  db_url: str) -> None:
    async with FakeTelegramServer() as fake:
        platform = await make_platform(database_url=db_url, bots=[BotConfig(
            id="shop", channel="telegram", token=TOKEN, secret=SECRET, api_base=fake.url)])
        client = platform.http_client()
        heads = {}
        for name, role in (("ann", "agent"), ("boss", "admin"), ("mark", "marketer")):
            _, key = await create_key(platform.db, name=name, role=role,
                                      now=platform.clock.now())
            heads[name] = {"Authorization": f"Bearer {key}"}
        for pool in ("roulette-10", "roulette-25", "roulette-shipping"):
            await import_codes(platform.db, pool, [f"{pool}-A", f"{pool}-B"],
                               platform.clock.now())

        updates = iter(range(1, 1000))
        await post(platform, _message(next(updates), UID, "/start"))
        await platform.drain()
        assert fake.texts(UID)[-1].startswith(f"Hi {NAME}!")
        await post(platform, _press(next(updates), _buttons(fake)[1]))  # news by email
        await platform.drain()
        email_update = next(updates)
        await post(platform, _message(email_update, UID, EMAIL))
        await post(platform, _message(next(updates), UID, contact={
            "phone_number": PHONE, "first_name": NAME, "user_id": UID}))
        await post(platform, _message(next(updates), UID, "spin"))
        await platform.drain()
        for _ in range(2):  # spin, then claim the prize (or spin again)
            await post(platform, _press(next(updates), _buttons(fake)[0]))
            await platform.drain()

        subscriber_id = (await client.get(f"/api/subscribers?q={UID}",
                                          headers=heads["boss"])).json()["items"][0]["id"]
        profile = (await client.get(f"/api/subscribers/{subscriber_id}",
                                    headers=heads["boss"])).json()
        assert profile["attributes"]["email"] == EMAIL
        assert profile["attributes"]["phone"] == PHONE
        contact_id = profile["contact_id"]
        await post(platform, _message(next(updates), 880011, f"/start rf-{contact_id}"))
        assert (await client.patch(f"/api/subscribers/{subscriber_id}", headers=heads["mark"],
                                   json={"attributes": {"card": CARD}})).status_code == 200
        event = await client.post("/api/events", headers=heads["mark"], json={
            "name": "order_placed", "event_id": f"order-of-{EMAIL}", "email": EMAIL,
            "data": {"email": EMAIL, "ship_to": f"{NAME} {LAST}", "phone": PHONE}})
        assert event.json()["status"] == "accepted"
        async with platform.db.session() as session:
            from bot_platform.catalog import tracked_link

            await tracked_link(session, url=f"https://shop.example.com/o?email={EMAIL}",
                               subscriber_id=subscriber_id, channel="telegram",
                               campaign="x", now=platform.clock.now(), public_url=None)

        await post(platform, _message(next(updates), UID, "operator"))
        await post(platform, _message(next(updates), UID,
                                      f"I am {NAME} {LAST}, call me at {PHONE}"))
        [chat] = (await client.get("/api/conversations", headers=heads["ann"])).json()
        path = f"/api/conversations/{chat['id']}"
        await client.post(f"{path}/claim", headers=heads["ann"])
        sent = await client.post(f"{path}/messages", headers=heads["ann"], json={
            "text": f"Thanks {NAME}, we will write to {EMAIL}",
            "buttons": [{"title": "Track", "url": f"https://t.example.com/?e={EMAIL}"}]})
        assert sent.status_code == 202
        note = await client.post(f"{path}/notes", headers=heads["ann"],
                                 json={"text": f"{NAME} {LAST} <{EMAIL}> {PHONE}"})
        assert note.status_code == 201
        platform.clock.advance(timedelta(minutes=1))
        await platform.drain()
        # Queued, not yet handed to the worker when the delete comes:
        await client.post(f"{path}/messages", headers=heads["ann"],
                          json={"text": f"One more thing, {NAME}..."})

        exported = await client.get(f"/api/subscribers/{subscriber_id}/personal-data",
                                    headers=heads["boss"])
        assert exported.status_code == 200
        as_text = json.dumps(exported.json(), ensure_ascii=False)
        for needle in NEEDLES:
            assert needle in as_text, needle
        assert (await client.get(f"/api/subscribers/{subscriber_id}/personal-data",
                                 headers=heads["mark"])).status_code == 403
        before = hits(await dump_every_table(platform), NEEDLES)
        assert {n for _, n in before} == set(NEEDLES)  # the search can find them
        assert {t for t, _ in before} >= {"outbox", "conversation_notes", "messages",
                                          "events", "contacts", "subscribers"}
        async with platform.db.session() as session:
            messages_before = await session.scalar(select(func.count()).select_from(
                Message).where(Message.subscriber_id == subscriber_id))

        assert (await client.delete(f"/api/subscribers/{subscriber_id}",
                                    headers=heads["mark"])).status_code == 204
        await platform.drain()

        tables = await dump_every_table(platform)
        assert hits(tables, NEEDLES) == []
        assert hits(tables, ("Marek",)), "the friend's data must stay"
        assert not [c for c in fake.sent(UID) if "One more thing" in str(c.params)]
        async with platform.db.session() as session:
            assert await session.scalar(select(func.count()).select_from(Message).where(
                Message.subscriber_id == subscriber_id)) == messages_before  # counts stay
            assert await session.scalar(select(func.count()).select_from(Outbox).where(
                Outbox.subscriber_id == subscriber_id, Outbox.status == "pending")) == 0
            subscribers = await session.scalar(select(func.count()).select_from(Subscriber))
            assert await session.scalar(select(func.count()).select_from(
                ProcessedEvent)) > 0
        detail = (await client.get(path, headers=heads["boss"])).json()
        assert detail["status"] == "resolved" and detail["customer"] is None
        assert not [h for h in detail["history"] if h["direction"] == "note" or h["text"]]
        # A re-delivered update is still recognized (ids are stored hashed).
        await post(platform, _message(email_update, UID, EMAIL))
        async with platform.db.session() as session:
            assert await session.scalar(select(func.count()).select_from(
                Subscriber)) == subscribers
        await client.aclose()


@pytest.mark.parametrize("role", ["agent", "marketer"])
async def test_only_admins_export_personal_data(make_platform, role: str) -> None:
    platform = await make_platform()
    _, key = await create_key(platform.db, name="k", role=role, now=platform.clock.now())
    async with platform.http_client() as client:
        response = await client.get("/api/subscribers/1/personal-data",
                                    headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 403


async def test_event_ids_are_stored_hashed_and_still_dedupe(make_platform,
                                                            db_url: str) -> None:
    """Viber and Facebook build event ids from the user id (``<sender>:<stamp>:read``)."""
    platform = await make_platform(database_url=db_url)
    console = platform.channel("console", "console")
    inbound = console.inbound("user-4242", "hello").model_copy(
        update={"event_id": "user-4242:1767225600:message"})
    await platform.engine.handle(inbound)
    await platform.engine.handle(inbound)  # the messenger re-sends it
    async with platform.db.session() as session:
        stored = (await session.scalars(select(ProcessedEvent.event_id))).all()
        inbound_messages = await session.scalar(select(func.count()).select_from(
            Message).where(Message.direction == "in"))
    assert stored == [privacy.event_key("user-4242:1767225600:message")]
    assert inbound_messages == 1


async def test_a_console_terminal_mark_is_forgotten(make_platform) -> None:
    """``botp chat`` marks its user in ``kv`` (``console:terminal:<bot>:<user id>``)."""
    from bots.console import attach_terminal

    platform = await make_platform()
    console = platform.channel("console", "console")
    await platform.engine.handle(console.inbound("user_77%", "hello"))
    await platform.engine.handle(console.inbound("user-78", "hello"))
    for user in ("user_77%", "user-78"):
        await attach_terminal(platform.kv, "console", user)
    async with platform.db.session() as session:
        forgotten = await session.scalar(select(Subscriber.id).where(
            Subscriber.user_id == "user_77%"))
    assert await privacy.forget(platform.engine, forgotten, now=platform.clock.now())
    async with platform.db.session() as session:
        keys = (await session.scalars(select(KeyValue.key))).all()
    assert [k for k in keys if k.startswith("console:terminal:")] == [
        "console:terminal:console:user-78"]

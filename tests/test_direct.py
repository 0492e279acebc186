"""The hot path's statements on the driver (bot_platform/database.py ``Direct``): written
rows read back the same as through SQLAlchemy, deferred writes run in order before the
transaction commits, a failing one rolls the whole transaction back, and a linked insert
(an outbox row and its message) links each child to its own parent."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError

from bot_platform.bulk_inserts import insert_linked_columns
from bot_platform.database import Database
from bot_platform.direct import direct
from bot_platform.models import Contact, Message, Outbox, Subscriber
from bot_platform.statement_forms import Columns
from bot_platform.turns import SUBSCRIBERS, UPDATE_SUBSCRIBER, SubscriberRow, write_subscriber

NOW = datetime(2026, 11, 30, 5, 0, tzinfo=UTC)


async def _database(db_url: str) -> Database:
    db = Database(db_url)
    await db.create_all()
    return db


async def _subscriber(db: Database, user: str = "alex") -> int:
    async with db.session() as session:
        contact = Contact(created_at=NOW)
        session.add(contact)
        await session.flush()
        subscriber = Subscriber(contact_id=contact.id, channel="console", bot_id="console",
                                user_id=user, attributes={"a": 1}, created_at=NOW,
                                updated_at=NOW)
        session.add(subscriber)
        await session.flush()
        return subscriber.id


async def test_a_row_read_on_the_driver_matches_the_orm(db_url) -> None:
    db = await _database(db_url)
    try:
        sid = await _subscriber(db)
        async with db.session() as session:
            connection = await direct(session)
            found = (await connection.execute(
                select(SUBSCRIBERS).where(SUBSCRIBERS.c.id == sid), {})).first()
            orm = await session.get(Subscriber, sid)
            assert found is not None and orm is not None
            assert found["attributes"] == {"a": 1} == orm.attributes
            assert found["created_at"] == orm.created_at
    finally:
        await db.close()


async def test_deferred_writes_run_in_order_before_commit(db_url) -> None:
    db = await _database(db_url)
    try:
        sid = await _subscriber(db)
        async with db.session() as session:
            connection = await direct(session)
            connection.defer = True
            row = SubscriberRow({"id": sid, "first_name": None})
            row.first_name = "Ann"
            await write_subscriber(connection, row)
            row.first_name = "Bea"
            await write_subscriber(connection, row)
            assert not row.changed
            await connection.flush()
        async with db.session() as session:
            assert await session.scalar(select(Subscriber.first_name)) == "Bea"
    finally:
        await db.close()


async def test_a_failing_deferred_write_rolls_the_transaction_back(db_url) -> None:
    db = await _database(db_url)
    try:
        sid = await _subscriber(db)
        other = await _subscriber(db, "sam")
        with pytest.raises(IntegrityError):
            async with db.session() as session:
                connection = await direct(session)
                connection.defer = True
                await connection.write(UPDATE_SUBSCRIBER, {"b_id": sid, "first_name": "Ann"})
                # (channel, bot, user) is unique: sam cannot become alex
                await connection.write(UPDATE_SUBSCRIBER, {"b_id": other, "user_id": "alex"})
                await connection.flush()
        async with db.session() as session:
            assert await session.scalar(select(Subscriber.first_name).where(
                Subscriber.id == sid)) is None
    finally:
        await db.close()


async def _insert_texts(session, sid: int, texts: list[str]) -> tuple[list[int], list[int]]:
    """A message and its outbox row per text, as ``OutboxQueue.enqueue_many`` writes them."""
    return await insert_linked_columns(session, Message, Columns({
        "text": list(texts)}, {
        "subscriber_id": sid, "channel": "console", "direction": "out", "kind": "text",
        "status": "queued", "flow": None, "broadcast_id": None, "created_at": NOW,
        "updated_at": NOW}), Outbox, Columns({
        "payload": [{"text": text} for text in texts]}, {
        "subscriber_id": sid, "channel": "console", "bot_id": "console",
        "recipient": "alex", "status": "pending", "next_attempt_at": NOW,
        "broadcast_id": None, "created_at": NOW}), link="message_id", count=len(texts))


async def _pairs(db: Database) -> list[tuple[str, str]]:
    async with db.session() as session:
        return [(text, payload["text"]) for text, payload in (await session.execute(
            select(Message.text, Outbox.payload).join(
                Outbox, Outbox.message_id == Message.id).order_by(Outbox.id))).all()]


async def test_a_linked_insert_gives_each_child_its_own_parent(db_url) -> None:
    db = await _database(db_url)
    try:
        sid = await _subscriber(db)
        texts = ["one", "two", "three"]
        async with db.session() as session:
            message_ids, outbox_ids = await _insert_texts(session, sid, texts)
        assert len(set(message_ids)) == len(set(outbox_ids)) == 3
        assert message_ids == sorted(message_ids) and outbox_ids == sorted(outbox_ids)
        assert await _pairs(db) == [(text, text) for text in texts]
        async with db.session() as session:
            assert await session.scalar(select(func.count()).select_from(Outbox)) == 3
    finally:
        await db.close()


async def test_linked_ids_stay_paired_after_the_newest_rows_are_deleted(db_url) -> None:
    """A person's deletion may take the newest messages and outbox rows: the next linked
    insert (on SQLite, ids worked out from the largest left) still pairs each outbox row
    with its own message, and one insert after another never reuses an id twice."""
    db = await _database(db_url)
    try:
        sid = await _subscriber(db)
        async with db.session() as session:
            first_messages, _ = await _insert_texts(session, sid, ["a", "b", "c", "d"])
        async with db.session() as session:  # the newest two go, as a deletion would
            await session.execute(delete(Outbox).where(
                Outbox.message_id.in_(first_messages[2:])))
            await session.execute(delete(Message).where(Message.id.in_(first_messages[2:])))
        async with db.session() as session:
            message_ids, outbox_ids = await _insert_texts(session, sid, ["e", "f", "g"])
            single = await _insert_texts(session, sid, ["h"])
        assert len({*message_ids, *single[0]}) == 4 and len({*outbox_ids, *single[1]}) == 4
        assert await _pairs(db) == [(t, t) for t in ("a", "b", "e", "f", "g", "h")]
    finally:
        await db.close()

"""Subscribers: list, profile, tags and attributes, export, right to be forgotten."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, HTTPException, Query
from fastapi.encoders import jsonable_encoder
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field
from sqlalchemy import delete, select

from admin_api.security import ADMIN, EVERYONE, MARKETING, PlatformDep, current, roles
from bot_platform import handoff, privacy
from bot_platform.apikeys import Principal
from bot_platform.models import (
    FlowState,
    Message,
    Subscriber,
    SubscriberTag,
)
from bot_platform.text import (
    DbId,
    DbInt,
    StorableJson,
    storable,
    storable_json,
    text,
    unstorable,
)

router = APIRouter(prefix="/subscribers", tags=["subscribers"])


class SubscriberPublic(BaseModel):
    id: int
    contact_id: int
    channel: str
    bot_id: str
    user_id: str
    status: str
    locale: str | None
    first_name: str | None
    last_name: str | None
    username: str | None
    source_ref: str | None
    attributes: dict[str, Any]
    tags: list[str] = Field(default_factory=list)
    last_inbound_at: datetime | None
    created_at: datetime


class SubscriberPage(BaseModel):
    items: list[SubscriberPublic]
    next_cursor: int | None = Field(description="Pass as `cursor` for the next page")


class MessagePublic(BaseModel):
    id: int
    direction: str
    kind: str
    text: str | None
    status: str
    error: str | None
    flow: str | None
    created_at: datetime


class FlowStatePublic(BaseModel):
    flow: str
    state: str
    status: str
    updated_at: datetime


class Profile(SubscriberPublic):
    identities: list[SubscriberPublic]
    recent_messages: list[MessagePublic] | None = Field(
        description="The last 50 messages in and out; null when the caller may not read "
                    "this person's chats (marketers; agents without a waiting chat of "
                    "theirs or one assigned to them)")
    flows: list[FlowStatePublic]


class PersonalData(BaseModel):
    subscriber_id: int
    tables: dict[str, list[dict[str, Any]]] = Field(
        description="Every row that holds the person's data, per table, all columns "
                    "(the inventory in bot_platform/privacy.py)")


class SubscriberUpdate(BaseModel):
    add_tags: list[text(64, min_length=1)] = Field(default_factory=list, max_length=100)
    remove_tags: list[text(64, min_length=1)] = Field(default_factory=list, max_length=100)
    attributes: StorableJson = Field(default_factory=dict, max_length=100,
                                     description="Set these; a null value removes one")


async def _tags(session: Any, ids: list[int]) -> dict[int, list[str]]:
    tags: dict[int, list[str]] = {i: [] for i in ids}
    if ids:
        for subscriber_id, tag in (await session.execute(select(
                SubscriberTag.subscriber_id, SubscriberTag.tag).where(
                SubscriberTag.subscriber_id.in_(ids)).order_by(SubscriberTag.tag))).all():
            tags[subscriber_id].append(tag)
    return tags


def _public(subscriber: Subscriber, tags: list[str]) -> SubscriberPublic:
    """The subscriber as the API shows it; text stored before the edge checked it (an
    unpaired surrogate) is shown replaced, so one row cannot break a page or an export."""
    data = SubscriberPublic.model_validate(subscriber, from_attributes=True)
    update: dict[str, Any] = {"tags": [storable(t) for t in tags],
                              "attributes": storable_json(data.attributes)}
    for name, value in data:
        if isinstance(value, str) and unstorable(value):
            update[name] = storable(value)
    return data.model_copy(update=update)


def _filtered(channel: str | None, status: str | None, tag: str | None, locale: str | None,
              q: str | None) -> Any:
    query = select(Subscriber)
    if channel:
        query = query.where(Subscriber.channel == channel)
    if status:
        query = query.where(Subscriber.status == status)
    if locale:
        query = query.where(Subscriber.locale == locale)
    if tag:
        query = query.where(Subscriber.id.in_(select(SubscriberTag.subscriber_id).where(
            SubscriberTag.tag == tag)))
    if q:
        like = f"%{q.lower()}%"
        from sqlalchemy import func, or_

        query = query.where(or_(func.lower(Subscriber.first_name).like(like),
                                func.lower(Subscriber.last_name).like(like),
                                func.lower(Subscriber.username).like(like),
                                Subscriber.user_id == q))
    return query


@router.get("", response_model=SubscriberPage, **roles(EVERYONE))
async def list_subscribers(platform: PlatformDep,
    channel: text(32) | None = None,
    status: Literal["subscribed", "unsubscribed"] | None = None,
    tag: text(64) | None = None, locale: text(16) | None = None,
    q: text(255) | None = Query(None, description="name, username or messenger user id"),
    cursor: DbInt | None = Query(None, description="from a previous page's next_cursor"),
    limit: int = Query(50, ge=1, le=500),
) -> SubscriberPage:
    """Subscribers, newest first, with filters and cursor pagination."""
    query = _filtered(channel, status, tag, locale, q)
    if cursor is not None:
        query = query.where(Subscriber.id < cursor)
    async with platform.db.session() as session:
        rows = (await session.scalars(query.order_by(Subscriber.id.desc())
                                      .limit(limit + 1))).all()
        tags = await _tags(session, [r.id for r in rows[:limit]])
    items = [_public(r, tags[r.id]) for r in rows[:limit]]
    return SubscriberPage(items=items, next_cursor=rows[limit - 1].id
                          if len(rows) > limit else None)


def _inert(value: Any) -> Any:
    """A CSV cell a spreadsheet shows as text: one starting like a formula (``=``, ``+``,
    ``-``, ``@``, tab, carriage return) gets a leading ``'`` (OWASP's advice)."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


EXPORT_RESPONSES: dict[int | str, dict[str, Any]] = {200: {
    "description": "CSV with a header row, or one JSON object per line",
    "content": {"text/csv": {"schema": {"type": "string"}},
                "application/x-ndjson": {"schema": {"type": "string"}}}}}


@router.get("/export", responses=EXPORT_RESPONSES, **roles(MARKETING))
async def export(platform: PlatformDep,
                 format: Literal["csv", "json"] = "csv", channel: text(32) | None = None,
                 status: Literal["subscribed", "unsubscribed"] | None = None,
                 tag: text(64) | None = None
                 ) -> StreamingResponse:
    """Every matching subscriber, streamed page by page (CSV or JSON lines). CSV cells
    that a spreadsheet would run as a formula start with ``'``."""
    columns = ["id", "contact_id", "channel", "bot_id", "user_id", "status", "locale",
               "first_name", "last_name", "username", "source_ref", "tags", "attributes",
               "last_inbound_at", "created_at"]

    async def rows() -> AsyncIterator[str]:
        if format == "csv":
            yield ",".join(columns) + "\r\n"
        after = 0
        while True:
            async with platform.db.session() as session:
                page = (await session.scalars(_filtered(channel, status, tag, None, None)
                                              .where(Subscriber.id > after)
                                              .order_by(Subscriber.id).limit(1000))).all()
                tags = await _tags(session, [s.id for s in page])
            if not page:
                return
            for subscriber in page:
                item = _public(subscriber, tags[subscriber.id]).model_dump(mode="json")
                if format == "json":
                    yield json.dumps(item, ensure_ascii=False) + "\n"
                else:
                    out = io.StringIO()
                    item["tags"] = "|".join(item["tags"])
                    item["attributes"] = json.dumps(item["attributes"], ensure_ascii=False)
                    csv.writer(out).writerow([_inert(item[c]) for c in columns])
                    yield out.getvalue()
            after = page[-1].id

    media = "text/csv" if format == "csv" else "application/x-ndjson"
    return StreamingResponse(rows(), media_type=media, headers={
        "Content-Disposition": f'attachment; filename="subscribers.{format}"'})


@router.get("/{subscriber_id}", response_model=Profile, **roles(EVERYONE))
async def profile(platform: PlatformDep,
                  subscriber_id: DbId, principal: Principal = current(EVERYONE)) -> Profile:
    """A subscriber with tags, attributes, all channel identities of the contact, recent
    messages (only for callers who may read the person's chats: the handoff rule) and
    flow positions."""
    async with platform.db.session() as session:
        subscriber = await session.get(Subscriber, subscriber_id)
        if subscriber is None:
            raise HTTPException(404, "no such subscriber")
        identities = (await session.scalars(select(Subscriber).where(
            Subscriber.contact_id == subscriber.contact_id).order_by(Subscriber.id))).all()
        tags = await _tags(session, [s.id for s in identities])
        recent: list[MessagePublic] | None = None
        if await handoff.may_read_subscriber(session, principal, subscriber_id):
            messages = (await session.scalars(select(Message).where(
                Message.subscriber_id == subscriber_id).order_by(Message.id.desc())
                .limit(50))).all()
            recent = [MessagePublic.model_validate(m, from_attributes=True)
                      for m in reversed(messages)]
        flows = (await session.scalars(select(FlowState).where(
            FlowState.subscriber_id == subscriber_id).order_by(FlowState.flow))).all()
    return Profile(
        **_public(subscriber, tags[subscriber.id]).model_dump(),
        identities=[_public(s, tags[s.id]) for s in identities],
        recent_messages=recent,
        flows=[FlowStatePublic.model_validate(f, from_attributes=True) for f in flows])


@router.get("/{subscriber_id}/personal-data", response_model=PersonalData, **roles(ADMIN))
async def personal_data(subscriber_id: DbId,
                        platform: PlatformDep) -> PersonalData:
    """Everything stored about the person behind a subscriber (every channel identity of
    its contact), from the same inventory the delete uses: for a data subject's access
    request. Admins only: it includes chat texts and notes."""
    async with platform.db.session() as session:
        person = await privacy.find_person(session, subscriber_id)
        if person is None:
            raise HTTPException(404, "no such subscriber")
        tables = await privacy.export_person(session, person)
    return PersonalData(subscriber_id=subscriber_id, tables=jsonable_encoder(tables))


@router.patch("/{subscriber_id}", response_model=SubscriberPublic, **roles(MARKETING))
async def update_subscriber(subscriber_id: DbId, body: SubscriberUpdate,
                            platform: PlatformDep) -> SubscriberPublic:
    """Add/remove tags and set attributes (flows see them on the next event)."""
    from bot_platform.database import insert_ignore

    async with platform.db.session() as session:
        subscriber = await session.get(Subscriber, subscriber_id)
        if subscriber is None:
            raise HTTPException(404, "no such subscriber")
        for tag in body.add_tags:
            await session.execute(insert_ignore(session, SubscriberTag).values(
                subscriber_id=subscriber_id, tag=tag))
        if body.remove_tags:
            await session.execute(delete(SubscriberTag).where(
                SubscriberTag.subscriber_id == subscriber_id,
                SubscriberTag.tag.in_(body.remove_tags)))
        if body.attributes:
            attributes = dict(subscriber.attributes or {})
            for key, value in body.attributes.items():
                if value is None:
                    attributes.pop(key, None)
                else:
                    attributes[key] = value
            subscriber.attributes = attributes
        subscriber.updated_at = platform.clock.now()
        await session.flush()
        tags = await _tags(session, [subscriber_id])
        return _public(subscriber, tags[subscriber_id])


@router.delete("/{subscriber_id}", status_code=204, **roles(MARKETING))
async def forget(subscriber_id: DbId, platform: PlatformDep) -> None:
    """Right to be forgotten, for the person behind the subscriber (every channel identity
    of its contact): names, username, phone, email, attributes, messenger user ids, the
    texts of every message in and out, chat summaries and internal notes, flow positions,
    answers, timers and shop event details go; queued messages are not sent; open chats
    are closed. Anonymous rows stay so figures keep their counts (the subscriber rows
    remain as "forgotten-<id>"). The inventory is ``bot_platform/privacy.py``."""
    if not await privacy.forget(platform.engine, subscriber_id, now=platform.clock.now()):
        raise HTTPException(404, "no such subscriber")

"""Human handoff for support staff: the queue of escalated chats, claiming (atomic: two
agents at once -> one wins, the other gets 409), history, replies through the same channel
adapter and delivery worker, internal notes, transfer, resolve (the bot resumes).

An agent sees waiting chats and their own; a chat assigned to another agent only after a
transfer. Admins see everything.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field
from sqlalchemy import func, select, update

from admin_api.security import SUPPORT, current, get_platform
from bot_platform.apikeys import Principal
from bot_platform.engine import notify_workers
from bot_platform.models import (
    ApiKey,
    Conversation,
    ConversationNote,
    Message,
    Outbox,
    Subscriber,
)
from bot_platform.types import Outgoing

router = APIRouter(prefix="/conversations", tags=["handoff"])
ROLES = {"openapi_extra": {"x-roles": sorted(SUPPORT)}}


class ConversationPublic(BaseModel):
    id: int
    subscriber_id: int
    channel: str
    locale: str | None
    customer: str | None
    status: str
    reason: str
    summary: str | None
    data: dict[str, Any]
    agent_id: str | None
    created_at: datetime
    assigned_at: datetime | None
    first_reply_at: datetime | None
    resolved_at: datetime | None


class HistoryItem(BaseModel):
    id: int
    direction: str  # in | out | note
    text: str | None
    status: str
    error: str | None
    author: str | None = None
    created_at: datetime


class ConversationDetail(ConversationPublic):
    history: list[HistoryItem]


class Reply(BaseModel):
    text: str = Field(min_length=1, max_length=4000)
    buttons: list[dict[str, str]] = Field(default_factory=list, max_length=3,
                                          description="[{title, url}]")
    image_url: str | None = None


class ReplyQueued(BaseModel):
    message_id: int
    outbox_ids: list[int]


class Note(BaseModel):
    text: str = Field(min_length=1, max_length=4000)


class Transfer(BaseModel):
    agent_id: int = Field(description="the API key id of the agent taking over")


class Resolve(BaseModel):
    start_flow: str | None = Field(None, description="e.g. a satisfaction question")


def _public(conversation: Conversation, subscriber: Subscriber) -> ConversationPublic:
    name = " ".join(x for x in (subscriber.first_name, subscriber.last_name) if x) or None
    return ConversationPublic(
        id=conversation.id, subscriber_id=subscriber.id, channel=subscriber.channel,
        locale=subscriber.locale, customer=name, status=conversation.status,
        reason=conversation.reason, summary=conversation.summary, data=conversation.data,
        agent_id=conversation.agent_id, created_at=conversation.created_at,
        assigned_at=conversation.assigned_at, first_reply_at=conversation.first_reply_at,
        resolved_at=conversation.resolved_at)


async def _load(session: Any, conversation_id: int, principal: Principal,
                write: bool = False) -> tuple[Conversation, Subscriber]:
    conversation = await session.get(Conversation, conversation_id)
    if conversation is None:
        raise HTTPException(404, "no such conversation")
    mine = conversation.agent_id == str(principal.key_id)
    if principal.role != "admin":
        if write and not mine:
            raise HTTPException(403, "claim this conversation first")
        if conversation.status == "assigned" and not mine:
            raise HTTPException(403, "assigned to another agent")
    subscriber = await session.get(Subscriber, conversation.subscriber_id)
    return conversation, subscriber


@router.get("", response_model=list[ConversationPublic], **ROLES)
async def queue(status: str = Query("waiting", pattern="^(waiting|assigned|resolved|open)$"),
                channel: str | None = None, locale: str | None = None,
                reason: str | None = None, limit: int = Query(50, ge=1, le=200),
                principal: Principal = current(SUPPORT),
                platform: Any = Depends(get_platform)) -> list[ConversationPublic]:
    """The queue, oldest first. Agents see waiting chats and their own."""
    statuses = ("waiting", "assigned") if status == "open" else (status,)
    query = select(Conversation, Subscriber).join(
        Subscriber, Subscriber.id == Conversation.subscriber_id).where(
        Conversation.status.in_(statuses))
    if principal.role != "admin":
        query = query.where((Conversation.status == "waiting")
                            | (Conversation.agent_id == str(principal.key_id)))
    if channel:
        query = query.where(Subscriber.channel == channel)
    if locale:
        query = query.where(Subscriber.locale == locale)
    if reason:
        query = query.where(Conversation.reason == reason)
    async with platform.db.session() as session:
        rows = (await session.execute(query.order_by(Conversation.created_at,
                                                     Conversation.id).limit(limit))).all()
    return [_public(c, s) for c, s in rows]


@router.post("/{conversation_id}/claim", response_model=ConversationPublic, **ROLES)
async def claim(conversation_id: int, principal: Principal = current(SUPPORT),
                platform: Any = Depends(get_platform)) -> ConversationPublic:
    """Take a waiting chat. Two agents at once: one wins, the other gets 409."""
    now = platform.clock.now()
    async with platform.db.session() as session:
        won = await session.execute(update(Conversation).where(
            Conversation.id == conversation_id, Conversation.status == "waiting").values(
            status="assigned", agent_id=str(principal.key_id), assigned_at=now,
            updated_at=now))
        if won.rowcount == 0:
            exists = await session.get(Conversation, conversation_id)
            raise HTTPException(404 if exists is None else 409,
                                "no such conversation" if exists is None
                                else "already taken")
        conversation, subscriber = await _load(session, conversation_id, principal)
        await session.refresh(conversation)
        return _public(conversation, subscriber)


@router.get("/{conversation_id}", response_model=ConversationDetail, **ROLES)
async def history(conversation_id: int, principal: Principal = current(SUPPORT),
                  platform: Any = Depends(get_platform)) -> ConversationDetail:
    """The whole chat: the customer's and the bot's messages (with the answers that led
    here), agents' replies with their delivery status, and internal notes."""
    async with platform.db.session() as session:
        conversation, subscriber = await _load(session, conversation_id, principal)
        messages = (await session.scalars(select(Message).where(
            Message.subscriber_id == subscriber.id).order_by(Message.id.desc())
            .limit(200))).all()
        notes = (await session.scalars(select(ConversationNote).where(
            ConversationNote.conversation_id == conversation_id))).all()
    items = [HistoryItem(id=m.id, direction=m.direction, text=m.text, status=m.status,
                         error=m.error, author=(m.payload or {}).get("agent"),
                         created_at=m.created_at) for m in messages]
    items += [HistoryItem(id=n.id, direction="note", text=n.text, status="internal",
                          error=None, author=n.author, created_at=n.created_at)
              for n in notes]
    items.sort(key=lambda item: (item.created_at, item.direction != "in", item.id))
    return ConversationDetail(**_public(conversation, subscriber).model_dump(),
                              history=items)


@router.post("/{conversation_id}/messages", response_model=ReplyQueued, status_code=202,
             **ROLES)
async def reply(conversation_id: int, body: Reply, principal: Principal = current(SUPPORT),
                platform: Any = Depends(get_platform)) -> ReplyQueued:
    """Send a reply through the customer's messenger (the delivery worker sends it; its
    status shows in the history). On Facebook it carries the HUMAN_AGENT tag."""
    from bot_platform.types import Button

    now = platform.clock.now()
    async with platform.db.session() as session:
        conversation, subscriber = await _load(session, conversation_id, principal,
                                               write=True)
        if conversation.status != "assigned":
            raise HTTPException(409, f"the conversation is {conversation.status}")
        message = Outgoing(
            text=body.text, image_url=body.image_url,
            buttons=tuple(Button(title=b["title"], url=b.get("url")) for b in body.buttons),
            tag="HUMAN_AGENT" if subscriber.channel == "facebook" else None)
        queued = await platform.engine.enqueue(session, subscriber, [(None, message)])
        outbox_ids = [i for i, _ in queued]
        message_ids = (await session.scalars(select(Outbox.message_id).where(
            Outbox.id.in_(outbox_ids)))).all()
        await session.execute(update(Message).where(Message.id.in_(message_ids)).values(
            payload={"agent": principal.name}))
        conversation.first_reply_at = conversation.first_reply_at or now
        conversation.updated_at = now
        await notify_workers(session)
    platform.engine.on_commit()
    return ReplyQueued(message_id=message_ids[0], outbox_ids=outbox_ids)


@router.post("/{conversation_id}/notes", status_code=201, response_model=HistoryItem,
             **ROLES)
async def add_note(conversation_id: int, body: Note, principal: Principal = current(SUPPORT),
                   platform: Any = Depends(get_platform)) -> HistoryItem:
    """An internal note: agents see it, the customer never does."""
    now = platform.clock.now()
    async with platform.db.session() as session:
        await _load(session, conversation_id, principal)
        note = ConversationNote(conversation_id=conversation_id, author=principal.name,
                                text=body.text, created_at=now)
        session.add(note)
        await session.flush()
        return HistoryItem(id=note.id, direction="note", text=note.text, status="internal",
                           error=None, author=note.author, created_at=now)


@router.post("/{conversation_id}/transfer", response_model=ConversationPublic, **ROLES)
async def transfer(conversation_id: int, body: Transfer,
                   principal: Principal = current(SUPPORT),
                   platform: Any = Depends(get_platform)) -> ConversationPublic:
    """Hand the chat to another agent (by their key id)."""
    now = platform.clock.now()
    async with platform.db.session() as session:
        conversation, subscriber = await _load(session, conversation_id, principal,
                                               write=True)
        target = await session.get(ApiKey, body.agent_id)
        if target is None or target.revoked_at is not None or target.role not in SUPPORT:
            raise HTTPException(422, "no such agent")
        conversation.status, conversation.agent_id = "assigned", str(target.id)
        conversation.assigned_at = conversation.assigned_at or now
        conversation.updated_at = now
        return _public(conversation, subscriber)


@router.post("/{conversation_id}/resolve", response_model=ConversationPublic, **ROLES)
async def resolve(conversation_id: int, body: Resolve, principal: Principal = current(SUPPORT),
                  platform: Any = Depends(get_platform)) -> ConversationPublic:
    """Close the chat: the bot answers the customer again (optionally starting a flow)."""
    if body.start_flow and body.start_flow not in platform.flows:
        raise HTTPException(422, f"unknown flow {body.start_flow!r}")
    now = platform.clock.now()
    async with platform.db.session() as session:
        conversation, subscriber = await _load(session, conversation_id, principal,
                                               write=True)
        conversation.status, conversation.resolved_at = "resolved", now
        conversation.updated_at = now
        data = _public(conversation, subscriber)
    if body.start_flow:
        await platform.engine.dispatch_event(subscriber.id, "conversation_resolved",
                                             start_flows=[body.start_flow])
    return data


# ---- live updates ----------------------------------------------------------------------

LIVE_POLL_SECONDS = 0.5


@router.get("/live/stream", **ROLES, response_class=StreamingResponse)
async def live(request: Request,
               max_seconds: float = Query(3600, gt=0, le=86400,
                                          description="end the stream after this long "
                                                      "(clients reconnect)"),
               principal: Principal = current(SUPPORT),
               platform: Any = Depends(get_platform)) -> StreamingResponse:
    """Server-Sent Events for agents: ``conversation`` (new escalations, claims, transfers,
    resolutions) and ``message`` (customer messages and replies, with delivery status) for
    the chats this key may see. Read from the database, so every process's changes show."""

    async def events() -> AsyncIterator[str]:
        since = platform.clock.now()
        last_message_id = 0
        async with platform.db.session() as session:
            last_message_id = await session.scalar(select(func.max(Message.id))) or 0
        yield "event: ready\ndata: {}\n\n"
        seen: set[tuple[Any, ...]] = set()  # (kind, id, version) already sent
        deadline = asyncio.get_running_loop().time() + max_seconds
        while asyncio.get_running_loop().time() < deadline and \
                not await request.is_disconnected():
            now = platform.clock.now()
            async with platform.db.session() as session:
                query = select(Conversation, Subscriber).join(
                    Subscriber, Subscriber.id == Conversation.subscriber_id)
                if principal.role != "admin":
                    query = query.where((Conversation.status == "waiting") | (
                        Conversation.agent_id == str(principal.key_id)))
                changed = (await session.execute(query.where(
                    Conversation.updated_at >= since))).all()
                visible = (await session.execute(query.where(
                    Conversation.status.in_(("waiting", "assigned"))))).all()
                by_subscriber = {s.id: c.id for c, s in visible}
                messages = (await session.scalars(select(Message).where(
                    Message.subscriber_id.in_(by_subscriber),
                    (Message.id > last_message_id) | (Message.updated_at >= since))
                    .order_by(Message.id))).all() if by_subscriber else []
            for conversation, subscriber in changed:
                marker = ("c", conversation.id, conversation.status, conversation.agent_id)
                if marker in seen:
                    continue
                seen.add(marker)
                data = _public(conversation, subscriber).model_dump_json()
                yield f"event: conversation\ndata: {data}\n\n"
            for message in messages:
                marker = ("m", message.id, message.status)
                if marker in seen:
                    continue
                seen.add(marker)
                item = HistoryItem(id=message.id, direction=message.direction,
                                   text=message.text, status=message.status,
                                   error=message.error,
                                   author=(message.payload or {}).get("agent"),
                                   created_at=message.created_at)
                payload = {"conversation_id": by_subscriber[message.subscriber_id],
                           **item.model_dump(mode="json")}
                yield f"event: message\ndata: {json.dumps(payload)}\n\n"
                last_message_id = max(last_message_id, message.id)
            since = now
            await asyncio.sleep(LIVE_POLL_SECONDS)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})

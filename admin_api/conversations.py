"""Human handoff for support staff: the queue of escalated chats, claiming (atomic: two
agents at once -> one wins, the other gets 409), history, replies through the same channel
adapter and delivery worker, internal notes, transfer, resolve (the bot resumes).

Who reads what is one rule (``bot_platform.handoff``): an agent reads waiting chats and
their own (open or resolved); a chat assigned to another agent only after a transfer to
them. Admins read everything. Status changes are compare-and-set: a transfer or resolve
of a resolved chat answers 409 and changes nothing.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any, NoReturn

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select, update

from admin_api.errors import unprocessable
from admin_api.security import SUPPORT, PlatformDep, current
from bot_platform import events, handoff, outbox
from bot_platform.apikeys import Principal
from bot_platform.models import (
    ApiKey,
    Conversation,
    ConversationNote,
    Message,
    Subscriber,
)
from bot_platform.statuses import ConversationStatus
from bot_platform.text import DbId, StorableText
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


class ReplyButton(BaseModel):
    """A link button under an agent's reply."""

    model_config = ConfigDict(extra="forbid")

    title: StorableText = Field(min_length=1, max_length=64)
    url: StorableText = Field(min_length=1, max_length=2048, pattern=r"^https?://")


class Reply(BaseModel):
    text: StorableText = Field(min_length=1, max_length=4000)
    buttons: list[ReplyButton] = Field(default_factory=list, max_length=3)
    image_url: str | None = Field(None, max_length=2048, pattern=r"^https?://")


class ReplyQueued(BaseModel):
    message_id: int
    outbox_ids: list[int]


class Note(BaseModel):
    text: StorableText = Field(min_length=1, max_length=4000)


class Transfer(BaseModel):
    agent_id: int = Field(ge=1, le=2**63 - 1,
                          description="the API key id of the agent taking over")


class Resolve(BaseModel):
    start_flow: str | None = Field(None, max_length=64,
                                   description="e.g. a satisfaction question")


def _public(conversation: Conversation, subscriber: Subscriber) -> ConversationPublic:
    name = " ".join(x for x in (subscriber.first_name, subscriber.last_name) if x) or None
    return ConversationPublic(
        id=conversation.id, subscriber_id=subscriber.id, channel=subscriber.channel,
        locale=subscriber.locale, customer=name, status=conversation.status,
        reason=conversation.reason, summary=conversation.summary, data=conversation.data,
        agent_id=conversation.agent_id, created_at=conversation.created_at,
        assigned_at=conversation.assigned_at, first_reply_at=conversation.first_reply_at,
        resolved_at=conversation.resolved_at)


def _item(message: Message) -> HistoryItem:
    return HistoryItem(id=message.id, direction=message.direction, text=message.text,
                       status=message.status, error=message.error,
                       author=(message.payload or {}).get("agent"),
                       created_at=message.created_at)


async def _load(session: Any, conversation_id: int, principal: Principal,
                act: bool = False) -> tuple[Conversation, Subscriber]:
    """The conversation and its customer, if ``principal`` may read it (and act on it:
    reply, transfer, resolve); 404/403 otherwise."""
    conversation = await session.get(Conversation, conversation_id)
    if conversation is None:
        raise HTTPException(404, "no such conversation")
    if not handoff.may_read(principal, conversation):
        raise HTTPException(403, "assigned to another agent")
    if act and not handoff.may_act(principal, conversation):
        raise HTTPException(403, "claim this conversation first")
    subscriber = await session.get(Subscriber, conversation.subscriber_id)
    return conversation, subscriber


async def _changed(session: Any, conversation: Conversation) -> NoReturn:
    """409 after a lost compare-and-set, saying what the chat is now."""
    await session.refresh(conversation)
    taken = conversation.status == ConversationStatus.ASSIGNED
    raise HTTPException(409, f"the conversation is {conversation.status}"
                        + (" (by another agent)" if taken else ""))


@router.get("", response_model=list[ConversationPublic], **ROLES)
async def queue(platform: PlatformDep,
                status: str = Query("waiting", pattern="^(waiting|assigned|resolved|open)$"),
                channel: str | None = None, locale: str | None = None,
                reason: str | None = None, limit: int = Query(50, ge=1, le=200),
                principal: Principal = current(SUPPORT)) -> list[ConversationPublic]:
    """The queue, oldest first. Agents see waiting chats and their own."""
    statuses = handoff.OPEN if status == "open" else (status,)
    query = select(Conversation, Subscriber).join(
        Subscriber, Subscriber.id == Conversation.subscriber_id).where(
        Conversation.status.in_(statuses), handoff.readable(principal))
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
async def claim(platform: PlatformDep, conversation_id: DbId,
                principal: Principal = current(SUPPORT)) -> ConversationPublic:
    """Take a waiting chat. Two agents at once: one wins, the other gets 409."""
    async with platform.db.session() as session:
        if not await handoff.claim(session, conversation_id, agent_id=str(principal.key_id),
                                   now=platform.clock.now()):
            exists = await session.get(Conversation, conversation_id)
            raise HTTPException(404 if exists is None else 409,
                                "no such conversation" if exists is None
                                else "already taken")
        conversation, subscriber = await _load(session, conversation_id, principal)
        await session.refresh(conversation)
        return _public(conversation, subscriber)


@router.get("/{conversation_id}", response_model=ConversationDetail, **ROLES)
async def history(platform: PlatformDep, conversation_id: DbId,
                  principal: Principal = current(SUPPORT)) -> ConversationDetail:
    """The whole chat: the customer's and the bot's messages (with the answers that led
    here), agents' replies with their delivery status, and internal notes."""
    async with platform.db.session() as session:
        conversation, subscriber = await _load(session, conversation_id, principal)
        messages = (await session.scalars(select(Message).where(
            Message.subscriber_id == subscriber.id).order_by(Message.id.desc())
            .limit(200))).all()
        notes = (await session.scalars(select(ConversationNote).where(
            ConversationNote.conversation_id == conversation_id))).all()
    items = [_item(m) for m in messages]
    items += [HistoryItem(id=n.id, direction="note", text=n.text, status="internal",
                          error=None, author=n.author, created_at=n.created_at)
              for n in notes]
    items.sort(key=lambda item: (item.created_at, item.direction != "in", item.id))
    return ConversationDetail(**_public(conversation, subscriber).model_dump(),
                              history=items)


@router.post("/{conversation_id}/messages", response_model=ReplyQueued, status_code=202,
             **ROLES)
async def reply(platform: PlatformDep, conversation_id: DbId, body: Reply,
                principal: Principal = current(SUPPORT)) -> ReplyQueued:
    """Send a reply through the customer's messenger (the delivery worker sends it; its
    status shows in the history). It goes as an agent's message: on Facebook a
    response inside the 24-hour window, with the HUMAN_AGENT tag after it (7 days). 409
    when the chat is not (or no longer) assigned."""
    from bot_platform.types import Button

    async with platform.db.session() as session:
        conversation, subscriber = await _load(session, conversation_id, principal,
                                               act=True)
        if not await handoff.record_reply(session, conversation, now=platform.clock.now()):
            await _changed(session, conversation)
        message = Outgoing(
            text=body.text, image_url=body.image_url,
            buttons=tuple(Button(title=b.title, url=b.url) for b in body.buttons),
            by_agent=True)
        queued = await platform.outbox.enqueue(session, subscriber, [(None, message)])
        outbox_ids = [i for i, _ in queued]
        message_ids = await outbox.message_ids(session, outbox_ids)
        await session.execute(update(Message).where(Message.id.in_(message_ids)).values(
            payload={"agent": principal.name}))
        await outbox.notify_workers(session)
    platform.engine.on_commit()
    return ReplyQueued(message_id=message_ids[0], outbox_ids=outbox_ids)


@router.post("/{conversation_id}/notes", status_code=201, response_model=HistoryItem,
             **ROLES)
async def add_note(platform: PlatformDep, conversation_id: DbId, body: Note,
                   principal: Principal = current(SUPPORT)) -> HistoryItem:
    """An internal note: agents who may read the chat see it, the customer never does."""
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
async def transfer(platform: PlatformDep, conversation_id: DbId, body: Transfer,
                   principal: Principal = current(SUPPORT)) -> ConversationPublic:
    """Hand an open chat to another agent (by their key id); 409 for a resolved chat."""
    async with platform.db.session() as session:
        conversation, subscriber = await _load(session, conversation_id, principal,
                                               act=True)
        target = await session.get(ApiKey, body.agent_id)
        if target is None or target.revoked_at is not None or target.role not in SUPPORT:
            raise unprocessable("no such agent", loc=("body", "agent_id"))
        if not await handoff.transfer(session, conversation, to_agent=str(target.id),
                                      now=platform.clock.now()):
            await _changed(session, conversation)
        await session.refresh(conversation)
        return _public(conversation, subscriber)


@router.post("/{conversation_id}/resolve", response_model=ConversationPublic, **ROLES)
async def resolve(platform: PlatformDep, conversation_id: DbId, body: Resolve,
                  principal: Principal = current(SUPPORT)) -> ConversationPublic:
    """Close the chat: the bot answers the customer again (optionally starting a flow).
    409 when it is already resolved (``resolved_at`` keeps the first resolution)."""
    if body.start_flow and body.start_flow not in platform.flows:
        raise unprocessable(f"unknown flow {body.start_flow!r}", loc=("body", "start_flow"))
    async with platform.db.session() as session:
        conversation, subscriber = await _load(session, conversation_id, principal,
                                               act=True)
        if not await handoff.resolve(session, conversation, now=platform.clock.now()):
            await _changed(session, conversation)
        await session.refresh(conversation)
        data = _public(conversation, subscriber)
    if body.start_flow:
        await events.dispatch(platform.engine, subscriber.id, "conversation_resolved",
                              start_flows=[body.start_flow])
    return data


# ---- live updates ----------------------------------------------------------------------

LIVE_POLL_SECONDS = 0.5


@router.get("/live/stream", **ROLES, response_class=StreamingResponse)
async def live(platform: PlatformDep, request: Request,
               max_seconds: float = Query(3600, gt=0, le=86400,
                                          description="end the stream after this long "
                                                      "(clients reconnect)"),
               principal: Principal = current(SUPPORT)) -> StreamingResponse:
    """Server-Sent Events for agents: ``conversation`` (new escalations, claims, transfers,
    resolutions) and ``message`` (customer messages and replies, with delivery status) for
    the chats this key may read; ``gone`` (``{id, status}``, no chat text) when a chat this
    stream showed leaves the key's view (another agent claimed it or it was transferred
    away). Read from the database, so every process's changes show. Every poll re-checks
    the key: revoked, the stream ends (``end``); the server shutting down ends it too."""

    async def events() -> AsyncIterator[str]:
        since = platform.clock.now()
        visible_rule = handoff.readable(principal)
        async with platform.db.session() as session:
            last_message_id = await session.scalar(select(func.max(Message.id))) or 0
            # What the agent's page already shows: told when it leaves their view.
            shown = set((await session.scalars(select(Conversation.id).where(
                Conversation.status.in_(handoff.OPEN), visible_rule))).all())
        yield "event: ready\ndata: {}\n\n"
        seen: set[tuple[Any, ...]] = set()  # (kind, id, version) already sent
        deadline = asyncio.get_running_loop().time() + max_seconds
        while asyncio.get_running_loop().time() < deadline:
            if platform.stopping.is_set() or await request.is_disconnected():
                return
            now = platform.clock.now()
            async with platform.db.session() as session:
                if await session.scalar(select(ApiKey.id).where(
                        ApiKey.id == principal.key_id, ApiKey.revoked_at.is_(None))) is None:
                    yield 'event: end\ndata: {"reason": "key revoked"}\n\n'
                    return
                query = select(Conversation, Subscriber).join(
                    Subscriber, Subscriber.id == Conversation.subscriber_id)
                changed = (await session.execute(query.where(
                    Conversation.updated_at >= since,
                    visible_rule | Conversation.id.in_(shown)))).all()
                visible = (await session.execute(query.where(
                    visible_rule, Conversation.status.in_(handoff.OPEN)))).all()
                by_subscriber = {s.id: c.id for c, s in visible}
                messages = (await session.scalars(select(Message).where(
                    Message.subscriber_id.in_(by_subscriber),
                    (Message.id > last_message_id) | (Message.updated_at >= since))
                    .order_by(Message.id))).all() if by_subscriber else []
            for conversation, subscriber in changed:
                if not handoff.may_read(principal, conversation):
                    shown.discard(conversation.id)
                    gone = {"id": conversation.id, "status": conversation.status}
                    yield f"event: gone\ndata: {json.dumps(gone)}\n\n"
                    continue
                if conversation.status in handoff.OPEN:
                    shown.add(conversation.id)
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
                payload = {"conversation_id": by_subscriber[message.subscriber_id],
                           **_item(message).model_dump(mode="json")}
                yield f"event: message\ndata: {json.dumps(payload)}\n\n"
                last_message_id = max(last_message_id, message.id)
            since = now
            await asyncio.sleep(LIVE_POLL_SECONDS)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})

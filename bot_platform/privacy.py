"""Personal data: THE inventory of where a person's values live, used by both the export
(``GET /api/subscribers/{id}/personal-data``) and the right to be forgotten
(``DELETE /api/subscribers/{id}``).

A person is a contact with all its channel identities (subscribers): the phone number
links identities, so forgetting one channel and keeping another would keep the person.

Every table of the schema is either in ``HOLDINGS`` (how to find the person's rows and
what a delete does there) or in ``NOT_PERSONAL`` (why it holds no person's value); a test
fails when a new table is in neither. After a delete no row holds the person's name,
username, phone, email, attribute values, messenger user id or the texts they wrote or
were sent; anonymous rows stay so figures keep their counts (a message was sent and
read, a chat was resolved, a prize was won, a link was clicked).

Inbound event ids are stored hashed (``event_key``): Viber and Facebook build them from
the user id, and dedupe only needs equality.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from sqlalchemy import (
    ColumnElement,
    String,
    cast,
    delete,
    func,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession

from bot_platform import handoff, outbox
from bot_platform.models import (
    Answer,
    BroadcastRecipient,
    Contact,
    Conversation,
    ConversationNote,
    CustomerEvent,
    FlowState,
    GameSpin,
    GameWin,
    Job,
    KeyValue,
    Message,
    Outbox,
    ProcessedEvent,
    PromoCode,
    Referral,
    Subscriber,
    SubscriberTag,
    TrackedLink,
)
from bot_platform.statuses import SubscriberStatus

if TYPE_CHECKING:
    from bot_platform.inbound import Engine

FORGOTTEN = "forgotten"


def event_key(event_id: str) -> str:
    """What ``processed_events`` stores for an inbound event id (SHA-256, hex)."""
    return hashlib.sha256(event_id.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True, slots=True)
class Person:
    """The rows that identify one person: their contact(s), channel identities and chats."""

    contact_ids: tuple[int, ...]
    subscriber_ids: tuple[int, ...]
    conversation_ids: tuple[int, ...]
    identities: tuple[tuple[str, str, str], ...]  # (channel, bot_id, user_id)


@dataclass(frozen=True, slots=True)
class PerRow:
    """A cleared value computed from the old one in Python (rows are few per person)."""

    new: Callable[[Any], Any]


@dataclass(frozen=True, slots=True)
class Holding:
    """Where a person's values live in one table, and what forgetting does there:
    ``delete`` the rows, ``clear`` the listed columns (the rows stay as anonymous counts),
    or ``keep`` rows that hold only ids of the anonymized rows (exported, not changed)."""

    model: Any
    of: Callable[[Person], ColumnElement[bool]]
    forget: Literal["delete", "clear", "keep"]
    cleared: Mapping[str, Any] = field(default_factory=dict)


def _origin(url: str) -> str:
    """A link's site without path or query (which may carry the person's values)."""
    parts = urlsplit(url or "")
    return urlunsplit((parts.scheme, parts.netloc, "/", "", "")) if parts.netloc else ""


HOLDINGS: tuple[Holding, ...] = (
    Holding(Contact, lambda p: Contact.id.in_(p.contact_ids), "clear",
            {"phone": None, "email": None}),
    Holding(Subscriber, lambda p: Subscriber.id.in_(p.subscriber_ids), "clear", {
        "user_id": literal(f"{FORGOTTEN}-", String) + cast(Subscriber.id, String),
        "first_name": None, "last_name": None, "username": None, "source_ref": None,
        "attributes": {}, "status": SubscriberStatus.UNSUBSCRIBED}),
    Holding(SubscriberTag, lambda p: SubscriberTag.subscriber_id.in_(p.subscriber_ids),
            "delete"),
    Holding(FlowState, lambda p: FlowState.subscriber_id.in_(p.subscriber_ids), "delete"),
    Holding(Message, lambda p: Message.subscriber_id.in_(p.subscriber_ids), "clear",
            {"text": None, "payload": None, "error": None, "channel_message_id": None}),
    Holding(Outbox, lambda p: Outbox.subscriber_id.in_(p.subscriber_ids), "clear",
            {"payload": {}, "recipient": FORGOTTEN, "last_error": None}),
    Holding(Job, lambda p: Job.subscriber_id.in_(p.subscriber_ids), "delete"),
    Holding(ConversationNote,
            lambda p: ConversationNote.conversation_id.in_(p.conversation_ids), "delete"),
    Holding(Conversation, lambda p: Conversation.id.in_(p.conversation_ids), "clear",
            {"summary": None, "data": {}}),
    Holding(CustomerEvent, lambda p: or_(CustomerEvent.subscriber_id.in_(p.subscriber_ids),
                                         CustomerEvent.contact_id.in_(p.contact_ids)),
            "clear", {"data": {}, "external_id": None}),
    Holding(Answer, lambda p: Answer.subscriber_id.in_(p.subscriber_ids), "delete"),
    Holding(TrackedLink, lambda p: TrackedLink.subscriber_id.in_(p.subscriber_ids), "clear",
            {"url": PerRow(_origin)}),
    Holding(PromoCode, lambda p: or_(PromoCode.contact_id.in_(p.contact_ids),
                                     PromoCode.subscriber_id.in_(p.subscriber_ids)), "keep"),
    Holding(GameSpin, lambda p: GameSpin.contact_id.in_(p.contact_ids), "keep"),
    Holding(GameWin, lambda p: GameWin.contact_id.in_(p.contact_ids), "keep"),
    Holding(Referral, lambda p: or_(Referral.referrer_contact_id.in_(p.contact_ids),
                                    Referral.referred_subscriber_id.in_(p.subscriber_ids)),
            "keep"),
    Holding(BroadcastRecipient,
            lambda p: BroadcastRecipient.subscriber_id.in_(p.subscriber_ids), "keep"),
)

NOT_PERSONAL: Mapping[str, str] = {
    "processed_events": "inbound event ids are stored hashed (event_key)",
    "kv": "adapter state: polling offsets, long button payloads, the catalog version; a "
          "key naming a person ends in ':<bot>:<user id>' and is deleted (_forget_keys)",
    "products": "the shop's catalog",
    "api_keys": "staff keys (hashed)",
    "broadcasts": "campaigns; recipients are in broadcast_recipients",
    "bots": "messenger bot settings",
    "flow_versions": "flow definitions",
    "ai_budget": "AI tokens spent and reserved per bot and month",
}


async def find_person(session: AsyncSession, subscriber_id: int) -> Person | None:
    """The person behind a subscriber: every identity of its contact, and their chats."""
    contact_id = await session.scalar(select(Subscriber.contact_id).where(
        Subscriber.id == subscriber_id))
    if contact_id is None:
        return None
    rows = (await session.execute(select(
        Subscriber.id, Subscriber.channel, Subscriber.bot_id, Subscriber.user_id).where(
        Subscriber.contact_id == contact_id).order_by(Subscriber.id))).all()
    subscriber_ids = tuple(r.id for r in rows)
    conversation_ids = tuple((await session.scalars(select(Conversation.id).where(
        Conversation.subscriber_id.in_(subscriber_ids)))).all())
    return Person((contact_id,), subscriber_ids, conversation_ids,
                  tuple(sorted((r.channel, r.bot_id, r.user_id) for r in rows)))


async def export_person(session: AsyncSession, person: Person) -> dict[str, list[dict]]:
    """Every row of the inventory that belongs to the person, per table, all columns."""
    out: dict[str, list[dict]] = {}
    for holding in HOLDINGS:
        table = holding.model.__table__
        rows = (await session.execute(select(table).where(holding.of(person)))).mappings()
        out[table.name] = [dict(row) for row in rows]
    return out


async def forget(engine: Engine, subscriber_id: int, *, now: datetime) -> bool:
    """Forget the person behind ``subscriber_id`` under the same per-identity locks the
    engine takes for their events (so an event in flight cannot write their data back);
    False when there is no such subscriber."""
    async with engine.db.session() as session:
        person = await find_person(session, subscriber_id)
    if person is None:
        return False
    # sorted identities: two callers lock in the same order
    async with engine.turns.isolated(*person.identities) as session:
        person = await find_person(session, subscriber_id)
        if person is None:
            return False
        await forget_person(session, person, now=now)
    return True


async def forget_person(session: AsyncSession, person: Person, *, now: datetime) -> None:
    """Forget the person in the caller's transaction (the caller holds their locks)."""
    ids = person.subscriber_ids
    # Nothing more goes out to them: what is queued is skipped (statuses as delivery
    # writes them for a blocked subscriber); chats waiting for an agent are closed.
    await outbox.skip_subscribers(session, ids, now)
    await handoff.close_for_subscribers(session, ids, now=now)
    for holding in HOLDINGS:
        await _forget(session, holding, person)
    await session.execute(update(Subscriber).where(Subscriber.id.in_(ids)).values(
        updated_at=now))
    await _forget_legacy_event_ids(session, person.identities)
    await _forget_keys(session, person.identities)


def _like_literal(value: str) -> str:
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


async def _forget_keys(session: AsyncSession,
                       identities: Sequence[tuple[str, str, str]]) -> None:
    """Adapter state keyed by a person (``console:terminal:<bot>:<user id>``)."""
    for _channel, bot_id, user_id in identities:
        await session.execute(delete(KeyValue).where(KeyValue.key.like(
            f"%:{_like_literal(bot_id)}:{_like_literal(user_id)}", escape="\\")))


async def _forget(session: AsyncSession, holding: Holding, person: Person) -> None:
    model, where = holding.model, holding.of(person)
    if holding.forget == "delete":
        await session.execute(delete(model).where(where)
                              .execution_options(synchronize_session=False))
        return
    if holding.forget == "keep":
        return
    per_row = {k: v for k, v in holding.cleared.items() if isinstance(v, PerRow)}
    in_sql = {k: v for k, v in holding.cleared.items() if not isinstance(v, PerRow)}
    if in_sql:
        await session.execute(update(model).where(where).values(in_sql)
                              .execution_options(synchronize_session=False))
    if per_row:
        for row in (await session.scalars(select(model).where(where))).all():
            for column, rule in per_row.items():
                setattr(row, column, rule.new(getattr(row, column)))
        await session.flush()


async def _forget_legacy_event_ids(session: AsyncSession,
                                   identities: Sequence[tuple[str, str, str]]) -> None:
    """Dedupe markers written before ids were hashed may embed the user id (hashed ones
    are exactly 64 characters and are left alone)."""
    for channel, bot_id, user_id in identities:
        pattern = "%" + user_id.replace("\\", "\\\\").replace("%", "\\%").replace(
            "_", "\\_") + "%"
        await session.execute(delete(ProcessedEvent).where(
            ProcessedEvent.channel == channel, ProcessedEvent.bot_id == bot_id,
            func.length(ProcessedEvent.event_id) != 64,
            ProcessedEvent.event_id.like(pattern, escape="\\")))

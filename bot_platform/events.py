"""Customer events from the shop (``cart_updated``, ``order_placed``, ``birthday`` ...):
validated, stored idempotently, and dispatched to the customer's flows.

A customer is named by a subscriber (id, or channel + bot + messenger user id) or by a
contact (id, phone or email). A contact with several channel identities gets the event on
the identity it used most recently, so a reminder is not sent on every messenger at once.
``dispatch`` stores an event once (by the shop's id) and runs the subscriber's turn for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy import select

from bot_platform.database import insert_ignore
from bot_platform.inbound import Engine
from bot_platform.models import Contact, CustomerEvent, Subscriber
from bot_platform.statuses import SubscriberStatus
from bot_platform.text import DbId, StorableJson, text

EVENT_NAME = r"^[a-z][a-z0-9_.-]{0,63}$"


def event_attributes(name: str, data: dict[str, Any]) -> dict[str, Any]:
    """What a shop event tells flows, as attributes prefixed with the event's name:
    scalars as they are (``cart_updated_total``), item lists as a readable line
    (``cart_updated_items``: "Rich cream x2, Gel cleanser") and a count
    (``cart_updated_count``)."""
    prefix = name.replace(".", "_").replace("-", "_")
    values: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            values[f"{prefix}_{key}"] = value
        elif isinstance(value, list) and all(isinstance(v, dict) for v in value):
            names = []
            for item in value:
                label = str(item.get("title") or item.get("name") or item.get("sku") or "")
                quantity = item.get("qty") or item.get("quantity")
                names.append(f"{label} x{quantity}" if quantity and quantity != 1 else label)
            values[f"{prefix}_{key}"] = ", ".join(n for n in names if n)
            values[f"{prefix}_count"] = len(value)
    return values


async def dispatch(
    engine: Engine, subscriber_id: int | None, name: str, data: dict[str, Any] | None = None,
    *, external_id: str | None = None, occurred_at: datetime | None = None,
    contact_id: int | None = None, start_flows: Sequence[str] | None = None,
) -> tuple[bool, list[int]]:
    """Record a shop event and let the subscriber's flows react: start flows triggered
    by it, move flows waiting for it. Returns (stored, outbox ids); stored is False
    when an event with the same ``external_id`` was recorded before."""
    identity: tuple[str, str, str] | None = None
    if subscriber_id is not None:
        async with engine.db.session() as session:
            subscriber = await session.get(Subscriber, subscriber_id)
            if subscriber is not None:
                identity = (subscriber.channel, subscriber.bot_id, subscriber.user_id)
                contact_id = contact_id or subscriber.contact_id
    async with engine.turns.open(identity) as unit:
        now = engine.clock.now()
        stored = await unit.session.execute(insert_ignore(unit.session, CustomerEvent).values(
            external_id=external_id, name=name, contact_id=contact_id,
            subscriber_id=subscriber_id if identity else None, data=data or {},
            occurred_at=occurred_at or now, created_at=now))
        if stored.rowcount == 0:
            return False, []
        if identity is None:
            return True, []
        work = await engine.turns.load(unit.session, subscriber_id)
        if isinstance(work, str):
            return True, []
        turn = work.turn
        if data:
            turn.attributes.update(event_attributes(name, data))
            turn.attributes_changed = True
        for position in engine.router.active(turn):
            await engine.flows[position.flow].fire(turn, position, f"event:{name}")
        turn.pending_starts.extend(
            engine.flows.triggered_by("event", name) if start_flows is None else start_flows)
        await engine.router.run_pending_starts(turn)
        unit.queued.extend(await work.save())
    return True, [i for i, _ in unit.queued]


class EventIn(BaseModel):
    """One shop event as posted by the shop (API, CLI or a JSON-lines file)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=EVENT_NAME)
    event_id: text(255) | None = None  # the shop's id: idempotency
    subscriber_id: DbId | None = None
    channel: text(32) | None = None
    bot_id: text(64) | None = None
    user_id: text(128) | None = None
    contact_id: DbId | None = None
    phone: text(32) | None = None
    email: text(255) | None = None
    data: StorableJson = Field(default_factory=dict)
    occurred_at: datetime | None = None

    @model_validator(mode="after")
    def _names_a_customer(self) -> EventIn:
        trio = (self.channel, self.bot_id, self.user_id)
        if any(trio) and not all(trio):
            raise ValueError("channel, bot_id and user_id go together")
        if not (self.subscriber_id or all(trio) or self.contact_id or self.phone
                or self.email):
            raise ValueError("name the customer: subscriber_id, channel+bot_id+user_id, "
                             "contact_id, phone or email")
        return self


class IngestResult(BaseModel):
    status: Literal["accepted", "duplicate", "unknown_customer"]
    subscriber_id: int | None = None
    outbox_ids: list[int] = Field(default_factory=list)


async def resolve_customer(engine: Engine, event: EventIn) -> tuple[int | None, int | None]:
    """(contact id, subscriber id to act on) for an event; None where unknown."""
    async with engine.db.session() as session:
        if event.subscriber_id or event.user_id:
            query = select(Subscriber.contact_id, Subscriber.id)
            query = query.where(Subscriber.id == event.subscriber_id) if event.subscriber_id \
                else query.where(Subscriber.channel == event.channel,
                                 Subscriber.bot_id == event.bot_id,
                                 Subscriber.user_id == event.user_id)
            row = (await session.execute(query)).first()
            return (row[0], row[1]) if row else (None, None)
        contact_id = event.contact_id
        if contact_id is None:
            match = Contact.phone == event.phone if event.phone else Contact.email == event.email
            contact_id = await session.scalar(select(Contact.id).where(match).limit(1))
            if contact_id is None and event.email:
                # An email captured in a flow lives on the subscriber's attributes.
                contact_id = await session.scalar(select(Subscriber.contact_id).where(
                    Subscriber.attributes["email"].as_string() == event.email.lower()
                ).limit(1))
        if contact_id is None:
            return None, None
        subscriber_id = await session.scalar(
            select(Subscriber.id).where(Subscriber.contact_id == contact_id)
            .order_by((Subscriber.status == SubscriberStatus.SUBSCRIBED).desc(),
                      Subscriber.last_inbound_at.desc().nulls_last(), Subscriber.id.desc())
            .limit(1))
        return contact_id, subscriber_id


async def ingest(engine: Engine, event: EventIn) -> IngestResult:
    """Store the event once and let the customer's flows react to it."""
    contact_id, subscriber_id = await resolve_customer(engine, event)
    stored, outbox_ids = await dispatch(
        engine, subscriber_id, event.name, event.data, external_id=event.event_id,
        occurred_at=event.occurred_at, contact_id=contact_id)
    if not stored:
        return IngestResult(status="duplicate", subscriber_id=subscriber_id)
    if subscriber_id is None:
        return IngestResult(status="unknown_customer")
    return IngestResult(status="accepted", subscriber_id=subscriber_id, outbox_ids=outbox_ids)

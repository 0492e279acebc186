"""A broadcast's figures per variant: people, not parts (a message may go out as several
outbox rows), clicks on its tracked links and orders within the attribution window."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import and_, case, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from bot_platform.models import (
    Broadcast,
    BroadcastRecipient,
    CustomerEvent,
    Message,
    Outbox,
    Subscriber,
    TrackedLink,
)
from bot_platform.statuses import MessageStatus, OutboxStatus, RecipientStatus


async def stats(session: AsyncSession, broadcast: Broadcast,
                attribution: timedelta = timedelta(days=7)) -> dict[str, Any]:
    """Per variant: targeted, queued, skipped and failed by reason, sent, delivered, read,
    clicked (tracked links), converted (an order within the attribution window)."""
    result: dict[str, Any] = {}
    recipients = (await session.execute(select(
        BroadcastRecipient.variant, BroadcastRecipient.status, BroadcastRecipient.reason,
        func.count()).where(BroadcastRecipient.broadcast_id == broadcast.id).group_by(
        BroadcastRecipient.variant, BroadcastRecipient.status,
        BroadcastRecipient.reason))).all()
    for variant in [v["name"] for v in broadcast.variants]:
        result[variant] = {"targeted": 0, "queued": 0, "sent": 0, "delivered": 0, "read": 0,
                           "clicked": 0, "converted": 0, "skipped": {}, "failed": {}}
    for variant, status, reason, count in recipients:
        row = result[variant]
        row["targeted"] += count
        if status == RecipientStatus.QUEUED:
            row["queued"] += count
        elif status == RecipientStatus.SKIPPED:
            row["skipped"][reason or "unknown"] = row["skipped"].get(reason or "unknown",
                                                                     0) + count
    recipient_variant = select(BroadcastRecipient.subscriber_id, BroadcastRecipient.variant,
                               BroadcastRecipient.status, BroadcastRecipient.due_at).where(
        BroadcastRecipient.broadcast_id == broadcast.id).subquery()
    # A message may go out as several parts (one outbox row and one call each: picture,
    # text, buttons): figures count people. A person is sent when all their parts were,
    # delivered / read when any part was, failed or skipped by their first such part.
    per_person = select(
        recipient_variant.c.variant.label("variant"),
        func.count().label("parts"),
        func.sum(case((Outbox.status == OutboxStatus.SENT, 1), else_=0)).label("sent"),
        func.max(case((Message.status.in_((MessageStatus.DELIVERED, MessageStatus.READ)), 1),
                      else_=0))
        .label("delivered"),
        func.max(case((Message.status == MessageStatus.READ, 1), else_=0)).label("read"),
        func.min(case((Outbox.status.in_((OutboxStatus.FAILED, OutboxStatus.SKIPPED)), Outbox.id)))
        .label("first_bad"),
    ).join(Outbox, Outbox.subscriber_id == recipient_variant.c.subscriber_id).join(
        Message, Message.id == Outbox.message_id).where(
        Outbox.broadcast_id == broadcast.id).group_by(
        recipient_variant.c.variant, recipient_variant.c.subscriber_id).subquery()
    bad = aliased(Outbox)
    all_sent = (per_person.c.parts == per_person.c.sent).label("all_sent")
    outcomes = (await session.execute(select(
        per_person.c.variant, all_sent, per_person.c.delivered, per_person.c.read,
        bad.status, bad.last_error, func.count()).outerjoin(
        bad, bad.id == per_person.c.first_bad).group_by(
        per_person.c.variant, all_sent, per_person.c.delivered, per_person.c.read,
        bad.status, bad.last_error))).all()
    for variant, sent, delivered, read, bad_status, error, count in outcomes:
        row = result[variant]
        if bad_status in (OutboxStatus.FAILED, OutboxStatus.SKIPPED):
            reason = (error or bad_status).split(":")[0]
            bucket = row["skipped"] if bad_status == OutboxStatus.SKIPPED else row["failed"]
            bucket[reason] = bucket.get(reason, 0) + count
        elif sent:
            row["sent"] += count
            row["delivered"] += count if delivered else 0
            row["read"] += count if read else 0
    clicked = (await session.execute(select(
        recipient_variant.c.variant, func.count(func.distinct(TrackedLink.subscriber_id)))
        .join(TrackedLink, TrackedLink.subscriber_id == recipient_variant.c.subscriber_id)
        .where(_attributed_link(broadcast, recipient_variant, attribution),
               TrackedLink.clicks > 0)
        .group_by(recipient_variant.c.variant))).all()
    for variant, count in clicked:
        result[variant]["clicked"] = count
    if broadcast.started_at is not None:
        converted = (await session.execute(select(
            recipient_variant.c.variant, func.count(func.distinct(Subscriber.contact_id)))
            .join(Subscriber, Subscriber.id == recipient_variant.c.subscriber_id)
            .join(CustomerEvent, and_(CustomerEvent.contact_id == Subscriber.contact_id,
                                      CustomerEvent.name == "order_placed",
                                      CustomerEvent.occurred_at >= broadcast.started_at,
                                      CustomerEvent.occurred_at <= broadcast.started_at
                                      + attribution))
            .group_by(recipient_variant.c.variant))).all()
        for variant, count in converted:
            result[variant]["converted"] = count
    return result


def _attributed_link(broadcast: Broadcast, recipient: Any, attribution: timedelta) -> Any:
    """Which tracked links count as the broadcast's clicks: its own URL buttons
    (``broadcast_id``), and for a flow variant the links that flow made for a recipient
    it was started for (recommendations, possibly turns later, when the person answers),
    from the recipient's moment until the attribution window after the start ends."""
    own = TrackedLink.broadcast_id == broadcast.id
    flows = [v for v in broadcast.variants if v.get("flow")]
    if broadcast.started_at is None or not flows:
        return own
    until = broadcast.started_at + attribution + (
        timedelta(days=1) if broadcast.local_time else timedelta(0))
    by_flow = and_(
        recipient.c.status == RecipientStatus.QUEUED,
        or_(*(and_(recipient.c.variant == v["name"], TrackedLink.flow == v["flow"])
              for v in flows)),
        TrackedLink.created_at >= broadcast.started_at, TrackedLink.created_at <= until,
        or_(recipient.c.due_at.is_(None), TrackedLink.created_at >= recipient.c.due_at))
    return or_(own, by_flow)

"""A broadcast's send job, one batch: pending recipients become outbox rows, each marked
queued (or skipped) in the same transaction, so a crash or a pause resumes without
re-sending or skipping anyone (``broadcasts.run_send_job`` holds the broadcast row and
decides what comes next).

Why its own statements: a batch runs on the event loop the live replies share, and on
SQLite holds the write lock meanwhile. Its statements are Core, compiled once and run on
the driver (``Direct``): the broadcast, then the recipients with their subscribers and
open conversations in one read; no ORM object and no expanding ``IN`` per batch, and a
recipient costs a tuple and a few appends (``OutboxQueue.enqueue_many``)."""

from __future__ import annotations

import asyncio
from collections import namedtuple
from datetime import datetime
from typing import Any

from sqlalchemy import Integer, bindparam, exists, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from bot_platform import handoff, outbox
from bot_platform.direct import direct
from bot_platform.fitting import share
from bot_platform.inbound import Engine
from bot_platform.models import Broadcast, BroadcastRecipient, Conversation, Job, Subscriber
from bot_platform.statement_forms import in_ids
from bot_platform.statuses import JobStatus, RecipientStatus, SubscriberStatus
from bot_platform.types import Outgoing

SEND_KIND = "broadcast_send"  # the send job's kind (``broadcasts.SendJob``)
YIELD_EVERY = 100  # recipients prepared between two turns of the event loop

# What a recipient's outbox rows need of their subscriber (``OutboxQueue.enqueue_many``).
Addressee = namedtuple("Addressee", ("id", "channel", "bot_id", "user_id"))

_BROADCASTS, _RECIPIENTS = Broadcast.__table__, BroadcastRecipient.__table__
_SUBSCRIBERS, _JOBS = Subscriber.__table__, Job.__table__
_CONVERSATIONS = Conversation.__table__
_BROADCAST = select(_BROADCASTS.c.status, _BROADCASTS.c.variants, _BROADCASTS.c.tag).where(
    _BROADCASTS.c.id == bindparam("b_id"))
_LOCKED_BROADCAST = _BROADCAST.with_for_update()  # PostgreSQL (SQLite: one writer at a time)
# The batch: pending recipients that are due, in id order, each with what its rows need
# and whether humans talk to them (an open conversation); a deleted subscriber is NULLs.
# The recipients are limited before the join: PostgreSQL, believing few rows pending,
# joined every pending recipient first and sorted them after (32 ms a batch of 30,000).
_DUE = select(_RECIPIENTS.c.id, _RECIPIENTS.c.subscriber_id, _RECIPIENTS.c.variant).where(
    _RECIPIENTS.c.broadcast_id == bindparam("b_id"),
    _RECIPIENTS.c.status == RecipientStatus.PENDING.value,
    or_(_RECIPIENTS.c.due_at.is_(None), _RECIPIENTS.c.due_at <= bindparam("b_now")),
).order_by(_RECIPIENTS.c.id).limit(bindparam("b_limit", type_=Integer)).subquery("due")
_BATCH = select(
    _DUE.c.id, _DUE.c.variant, _SUBSCRIBERS.c.id, _SUBSCRIBERS.c.channel,
    _SUBSCRIBERS.c.bot_id, _SUBSCRIBERS.c.user_id, _SUBSCRIBERS.c.status,
    _SUBSCRIBERS.c.locale, exists().where(
        _CONVERSATIONS.c.subscriber_id == _DUE.c.subscriber_id,
        or_(*(_CONVERSATIONS.c.status == status.value for status in handoff.OPEN))),
).select_from(_DUE.outerjoin(_SUBSCRIBERS, _SUBSCRIBERS.c.id == _DUE.c.subscriber_id)
              ).order_by(_DUE.c.id)
# Compare-and-set: only rows still pending change (the count tells whether all did).
_MARK = update(_RECIPIENTS).where(
    in_ids(_RECIPIENTS.c.id, "b_ids"),
    _RECIPIENTS.c.status == RecipientStatus.PENDING.value,
).values(status=bindparam("b_status"), reason=bindparam("b_reason"))
_NEXT_JOB = insert(_JOBS)


async def locked_broadcast(session: AsyncSession, broadcast_id: int
                           ) -> tuple[str, list[dict[str, Any]], str | None] | None:
    """The broadcast's status, variants and tag, its row locked until the transaction
    ends (``FOR UPDATE`` on PostgreSQL; SQLite runs one writer at a time); None: gone."""
    connection = await direct(session)
    statement = _LOCKED_BROADCAST if connection.dialect.name != "sqlite" else _BROADCAST
    found = (await connection.execute(statement, {"b_id": broadcast_id})).rows
    return tuple(found[0]) if found else None  # type: ignore[return-value]


async def next_job(session: AsyncSession, broadcast_id: int, due_at: datetime,
                   now: datetime) -> None:
    """The broadcast's next send job (written with the transaction's next trip)."""
    connection = await direct(session)
    with connection.deferring():
        await connection.write(_NEXT_JOB, {
            "kind": SEND_KIND, "subscriber_id": None, "flow": None,
            "payload": {"broadcast_id": broadcast_id}, "due_at": due_at,
            "status": JobStatus.PENDING.value, "attempts": 0, "created_at": now})


async def queue_batch(engine: Engine, session: AsyncSession, broadcast_id: int,
                      variants: list[dict[str, Any]], tag: str | None, batch: int,
                      now: datetime) -> int:
    """Queue up to ``batch`` pending recipients that are due, each exactly once; how
    many were taken (queued or skipped). Raises when some were no longer pending (the
    caller's transaction then rolls the whole batch back)."""
    connection = await direct(session)
    todo = (await connection.execute(_BATCH, {
        "b_id": broadcast_id, "b_now": now, "b_limit": batch})).rows
    by_name = {variant["name"]: variant for variant in variants}
    default_locale = engine.catalogs.default_locale
    sends: list[tuple[Addressee, list[tuple[str | None, Outgoing]]]] = []
    queued: list[int] = []
    unsubscribed: list[int] = []
    talking: list[int] = []
    flows: list[tuple[int, str]] = []
    # One message per variant and locale, not one per recipient (validated, fitted and
    # serialized once: a batch's CPU time holds the write lock on SQLite), and whether
    # it has URL buttons (then tracked per recipient).
    messages: dict[tuple[str, str | None], tuple[Outgoing, bool]] = {}
    for number, (recipient_id, variant, subscriber_id, channel, bot_id, user_id, status,
                 locale, in_conversation) in enumerate(todo, 1):
        if number % YIELD_EVERY == 0:
            # This process's sends wait on the event loop meanwhile: a pacer woken more
            # than ~10 ms late loses the slots it missed (ratelimit.Pacer).
            await asyncio.sleep(0)
        if status != SubscriberStatus.SUBSCRIBED:
            unsubscribed.append(recipient_id)
            continue
        if in_conversation:
            talking.append(recipient_id)
            continue
        queued.append(recipient_id)
        found = messages.get((variant, locale))
        if found is None:
            chosen = by_name[variant]
            if chosen.get("flow"):
                flows.append((subscriber_id, chosen["flow"]))
                continue
            message = _message(chosen, locale, default_locale)
            if tag:
                message = message.model_copy(update={"outside_window": tag})
            share(message)  # the same for the batch: fitted once per channel
            found = messages[(variant, locale)] = (
                message, any(button.url for button in message.buttons))
        message, tracked = found
        subscriber = Addressee(subscriber_id, channel, bot_id, user_id)
        if tracked:
            message = await _tracked(session, engine, message, subscriber, broadcast_id, now)
        sends.append((subscriber, [(None, message)]))
    for subscriber_id, flow in flows:
        await _start_flow(engine, session, await session.get(Subscriber, subscriber_id),
                          flow, broadcast_id)
    await engine.outbox.enqueue_many(session, sends, broadcast_id=broadcast_id)
    connection = await direct(session)  # a flow's turn may have flushed the ORM
    marked = 0
    for recipient_ids, status, reason in (
            (queued, RecipientStatus.QUEUED, None),
            (unsubscribed, RecipientStatus.SKIPPED, "unsubscribed"),
            (talking, RecipientStatus.SKIPPED, "in_conversation")):
        if recipient_ids:
            marked += (await connection.execute(_MARK, {
                "b_ids": recipient_ids, "b_status": status.value,
                "b_reason": reason})).rowcount
    if marked != len(todo):  # someone else queued some of them: undo this batch
        raise RuntimeError(f"broadcast {broadcast_id}: {len(todo) - marked} of {len(todo)} "
                           "recipients were no longer pending")
    return len(todo)


def _message(variant: dict[str, Any], locale: str | None, default_locale: str) -> Outgoing:
    messages = variant["messages"]
    content = messages.get(locale or "") or messages.get(default_locale) or next(
        iter(messages.values()))
    return Outgoing.model_validate(content)


async def _tracked(session: AsyncSession, engine: Engine, message: Outgoing,
                   subscriber: Addressee, broadcast_id: int, now: datetime) -> Outgoing:
    """URL buttons become tracked links (clicks count for the broadcast)."""
    from bot_platform.catalog import tracked_link

    buttons = []
    for button in message.buttons:
        if button.url:
            url = await tracked_link(
                session, url=button.url, subscriber_id=subscriber.id,
                channel=subscriber.channel, campaign=f"broadcast-{broadcast_id}", now=now,
                public_url=engine.public_url, broadcast_id=broadcast_id)
            button = button.model_copy(update={"url": url})
        buttons.append(button)
    return message.model_copy(update={"buttons": tuple(buttons)})


async def _start_flow(engine: Engine, session: AsyncSession, subscriber: Subscriber,
                      flow: str, broadcast_id: int) -> None:
    """A flow variant: the flow starts for this subscriber as if a trigger fired."""
    work = await engine.turns.join(session, subscriber)
    if flow in engine.flows:
        work.turn.pending_starts.append(flow)
        await engine.router.run_pending_starts(work.turn)
    queued = await work.save()
    await outbox.of_broadcast(session, [i for i, _ in queued], broadcast_id)

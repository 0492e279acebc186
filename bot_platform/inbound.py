"""The engine: the inbound chain every messenger event runs through.

``Engine.handle(inbound)`` runs a chain of small steps (aiogram-style middleware):

    log errors -> unit of work (per-subscriber locks + transaction) -> dedupe ->
    receipts -> upsert subscriber -> referral -> locale -> record inbound -> handoff ->
    flows

Everything an event changes (subscriber, flow positions, outbox rows, timers, the dedupe
marker) is written in ONE transaction, so a crash leaves either all of it or none.
The rest of a turn lives in modules named for what they own, wired here:
``turns`` (isolation, loading and saving a turn), ``routing`` (which flow an event
moves), ``handoff`` (reaching a human), ``timers`` (flow timers, read fallbacks);
shop events go through ``events.dispatch``.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from typing import Any

from sqlalchemy import bindparam, func, insert, literal, or_, select, true, update
from sqlalchemy.ext.asyncio import AsyncSession

from bot_platform.channels import HandledEvent
from bot_platform.clock import Clock
from bot_platform.database import Database, insert_ignore
from bot_platform.direct import Direct, direct
from bot_platform.errors import StorageUnavailable
from bot_platform.event_groups import EventGroups, groups_events
from bot_platform.flows.machine import FlowSet
from bot_platform.handoff import OPEN, HandoffRules
from bot_platform.i18n import Catalogs
from bot_platform.insert_claims import InsertClaim
from bot_platform.logs import log_context, set_log_field
from bot_platform.metrics import Metrics
from bot_platform.models import Contact, Conversation, Message, ProcessedEvent, Subscriber
from bot_platform.outbox import OutboxQueue
from bot_platform.pressure import InteractivePressure
from bot_platform.privacy import event_key
from bot_platform.routing import Router
from bot_platform.statement_forms import linked_pair
from bot_platform.statuses import MessageStatus, SubscriberStatus
from bot_platform.timers import Timers
from bot_platform.turns import (
    SUBSCRIBER_COLUMNS,
    SUBSCRIBERS,
    SubscriberRow,
    Turns,
    advisory_key,
    write_subscriber,
)
from bot_platform.types import Capabilities, Inbound, InboundKind, Outgoing

log = logging.getLogger(__name__)

STATUS_RANK = {MessageStatus.QUEUED: 0, MessageStatus.SENT: 1, MessageStatus.DELIVERED: 2,
               MessageStatus.READ: 3}
USER_KINDS = {InboundKind.TEXT, InboundKind.BUTTON, InboundKind.START, InboundKind.CONTACT,
              InboundKind.MEDIA, InboundKind.REFERRAL, InboundKind.SUBSCRIBED}
RECORDED_KINDS = {InboundKind.TEXT, InboundKind.BUTTON, InboundKind.CONTACT, InboundKind.MEDIA,
                  InboundKind.START}
# The hot path's statements, on the tables (Core): built once, compiled once (cached).
CONTACTS, MESSAGES, CONVERSATIONS = Contact.__table__, Message.__table__, Conversation.__table__
_OPEN_CONVERSATION = (select(CONVERSATIONS.c.id).where(
    CONVERSATIONS.c.subscriber_id == SUBSCRIBERS.c.id,
    or_(*(CONVERSATIONS.c.status == status for status in OPEN)))
    .limit(1).scalar_subquery().label("open_conversation"))
SELECT_SUBSCRIBER = select(SUBSCRIBERS, _OPEN_CONVERSATION).where(
    SUBSCRIBERS.c.channel == bindparam("b_channel"), SUBSCRIBERS.c.bot_id == bindparam("b_bot"),
    SUBSCRIBERS.c.user_id == bindparam("b_user"))
INSERT_CONTACT = insert(CONTACTS).returning(CONTACTS.c.id)
INSERT_SUBSCRIBER = insert(SUBSCRIBERS).returning(SUBSCRIBERS.c.id)
INSERT_MESSAGE = insert(MESSAGES)
TOUCH_CONVERSATION = update(CONVERSATIONS).where(
    CONVERSATIONS.c.id == bindparam("b_id")).values(updated_at=bindparam("b_now"))
_NEW_CONTACT = ("phone", "created_at")
OTHER_CONTACT = select(CONTACTS.c.id).where(
    CONTACTS.c.phone == bindparam("b_phone"), CONTACTS.c.id != bindparam("b_id")).limit(1)
SET_CONTACT_PHONE = update(CONTACTS).where(CONTACTS.c.id == bindparam("b_id")).values(
    phone=bindparam("b_phone"))


NOT_READ = object()  # ``EventContext.prefetched``: the subscriber was not read yet


def dedupe_and_subscriber(dedupe: Any) -> Any:
    """PostgreSQL: the dedupe insert and ``SELECT_SUBSCRIBER`` in one statement (one
    trip): always one row, ``fresh`` (1: a new event) and the subscriber's columns
    (NULL when there is none). The insert and the read touch different tables, so one
    snapshot changes nothing; the advisory lock was taken by an earlier statement."""
    marker = ProcessedEvent.__table__.c
    fresh = dedupe.values({name: bindparam(name) for name in marker.keys()}).returning(
        literal(1)).cte("fresh")  # named binds: a nested insert takes no column keys
    found = SELECT_SUBSCRIBER.subquery("found")
    one = select(literal(1).label("one")).subquery("one")
    return select(select(func.count()).select_from(fresh).scalar_subquery().label("fresh"),
                  *found.c).select_from(one.outerjoin(found, true()))


@dataclass
class EventContext:
    """What the steps of the inbound chain share."""

    inbound: Inbound
    session: AsyncSession | None = None
    connection: Direct | None = None  # the session's, for the hot path's statements
    subscriber: SubscriberRow | None = None
    conversation_id: int | None = None  # the chat humans own now, if any
    duplicate: bool = False
    queued: list[tuple[int, Outgoing]] = field(default_factory=list)
    hold: timedelta | None = None
    new_subscriber: bool = False
    # The subscriber's row as read with the dedupe (PostgreSQL), or ``NOT_READ``.
    prefetched: dict[str, Any] | object | None = NOT_READ
    # This process sends the turn's rows: their insert may claim them (``insert_claims``).
    claim: InsertClaim | None = None

    def reset(self) -> None:
        """Forget what an earlier run of the chain found (its transaction was lost)."""
        self.subscriber, self.conversation_id = None, None
        self.duplicate = self.new_subscriber = False
        self.prefetched = NOT_READ


Next = Callable[[EventContext], Awaitable[None]]
Step = Callable[[EventContext, Next], Awaitable[None]]


async def _end(context: EventContext) -> None:
    """The end of the chain."""


class Engine:
    """Turns events into state changes and queued messages. Built by the composition root."""

    def __init__(
        self,
        db: Database,
        flows: FlowSet,
        catalogs: Catalogs,
        clock: Clock,
        capabilities: Callable[[str, str], Capabilities] = lambda channel, bot: Capabilities(),
        on_commit: Callable[[], None] | None = None,
        outbox: OutboxQueue | None = None,
    ) -> None:
        self.db = db
        self.flows = flows
        self.catalogs = catalogs
        self.clock = clock
        self.capabilities = capabilities
        self.on_commit = on_commit or (lambda: None)
        self.outbox = outbox or OutboxQueue(db, clock, capabilities, self.on_commit)
        self.public_url: str | None = None  # where tracked links redirect through /r/
        self.random = random.Random()  # games draw from this (tests may seed it)
        self.metrics = Metrics()  # the platform hands in its own (bot_platform.metrics)
        # Turns in flight; delivery's broadcast rows yield to them (shared by the platform).
        self.pressure = InteractivePressure()
        # The parts a turn goes through, each in the module named for what it owns.
        self.turns = Turns(self)  # per-subscriber isolation, loading and saving turns
        self.handoff = HandoffRules()  # the words that reach a human, support hours
        self.router = Router(self)  # which flow an inbound event moves
        self.timers = Timers(self)  # the flow_timer and read_fallback job handlers
        self.steps: list[Step] = [
            self.step_log_errors, self.step_transaction, self.step_dedupe,
            self.step_receipts, self.step_upsert_subscriber, self.step_referral,
            self.step_locale,
            self.step_record_inbound, self.step_handoff, self.step_flows,
        ]
        self._chain: tuple[list[Step], Next] | None = None
        self._dedupe = insert_ignore(db.dialect, ProcessedEvent.__table__)
        self._dedupe_and_subscriber = (dedupe_and_subscriber(self._dedupe)
                                       if db.dialect == "postgresql" else None)
        # Events of different subscribers share transactions (group commit).
        self.groups = EventGroups(db, lambda: self.on_commit())

    # ---- the inbound chain ------------------------------------------------------------

    async def handle(self, inbound: Inbound, hold: timedelta | None = None) -> HandledEvent:
        """Process one inbound event exactly once (re-deliveries are no-ops).

        ``hold`` keeps the messages it queues from the worker for that long (or until
        ``release`` is called), so a webhook can answer with one of them itself."""
        context = EventContext(inbound, hold=hold)  # made storable by its validators
        self.metrics.inbound_event(context.inbound.channel, str(context.inbound.kind))
        with (self.pressure.turn(),
              log_context(bot=context.inbound.bot_id, channel=context.inbound.channel)):
            await self._composed()(context)
            self.pressure.queued(i for i, _ in context.queued)  # until they are sent
        return HandledEvent(
            inbound=inbound, duplicate=context.duplicate,
            outbox_ids=tuple(i for i, _ in context.queued),
            replies=tuple(m for _, m in context.queued))

    def _composed(self) -> Next:
        """The steps as one call (each step's ``call_next`` bound to the next), built again
        when ``steps`` changes: an event passes through one frame per step, not two."""
        if self._chain is None or self._chain[0] != self.steps:
            handler: Next = _end
            for step in reversed(self.steps):
                handler = partial(step, call_next=handler)
            self._chain = (list(self.steps), handler)
        return self._chain[1]

    async def step_log_errors(self, context: EventContext, call_next: Next) -> None:
        try:
            await call_next(context)
        except StorageUnavailable:
            raise  # the database is away, not this event: the caller says so once
        except Exception:
            i = context.inbound
            log.exception("failed to handle %s event %s of %s/%s", i.kind, i.event_id,
                          i.channel, i.bot_id)
            raise

    async def step_transaction(self, context: EventContext, call_next: Next) -> None:
        """The event's unit of work: the subscriber's locks and one transaction, which on
        SQLite it shares with events of other subscribers (``event_groups``)."""
        i = context.inbound
        identity = (i.channel, i.bot_id, i.user_id)
        if not groups_events(self.db):
            async with self.turns.open(identity, context.hold) as unit:
                await self._turn(context, call_next, unit.session, unit.queued, flush=False)
            return

        sender = self.turns.sender if context.hold is None else None
        taken: Any = None

        async def body(session: AsyncSession, _: Direct) -> list[int]:
            nonlocal taken
            taken = None  # a group whose transaction was lost runs this again
            # A fresh offer per run: its claim lives and dies with the run's savepoint.
            claim = context.claim = sender.offer(identity) if sender is not None else None
            try:
                await self._turn(context, call_next, session, [])
            finally:
                context.claim = None
            rows = [i for i, _ in context.queued]
            if sender is not None and rows:  # this process sends them (``own_replies``)
                taken = await sender.take(session, identity, rows, claim)
            return [] if taken is not None else rows  # the rest wake the workers

        async with self.turns.locks.hold(identity):  # until the group committed
            ran = await self.groups.run(body, wake=context.hold is None,
                                        lock=advisory_key(*identity))
            context.claim = None  # the turn alone below claims as before
            if ran:
                if taken is not None:
                    sender.taken(identity, taken)
                return
            # PostgreSQL: the subscriber is busy in another process's transaction; a
            # group must not wait for it: alone, the lock waited for as it comes.
            async with self.turns.open(identity, context.hold, held=True) as unit:
                await self._turn(context, call_next, unit.session, unit.queued, flush=False)

    async def _turn(self, context: EventContext, call_next: Next, session: AsyncSession,
                    queued: list[tuple[int, Outgoing]], flush: bool = True) -> None:
        """The rest of the chain in ``session``'s transaction, from a fresh start (a
        group whose transaction was lost runs its events again). Without ``flush``, the
        writes still deferred go with the NOTIFY or before the commit (one trip less)."""
        context.reset()
        context.session, context.queued = session, queued
        context.connection = connection = await direct(session)
        with connection.deferring():  # result-less writes go with the next trip
            await call_next(context)
            if flush:  # before the group releases the event's SAVEPOINT
                await connection.flush()

    async def step_dedupe(self, context: EventContext, call_next: Next) -> None:
        i, connection = context.inbound, context.connection
        assert connection is not None
        marker = {"channel": i.channel, "bot_id": i.bot_id, "event_id": event_key(i.event_id),
                  "processed_at": self.clock.now()}
        if self._dedupe_and_subscriber is not None and connection.adapter is not None:
            row = (await connection.execute(self._dedupe_and_subscriber, {
                **marker, "b_channel": i.channel, "b_bot": i.bot_id,
                "b_user": i.user_id})).first()
            assert row is not None
            fresh = bool(row["fresh"])
            context.prefetched = row if row["id"] is not None else None
        else:
            fresh = (await connection.execute(self._dedupe, marker)).rowcount != 0
        if not fresh:
            context.duplicate = True
            log.info("duplicate %s event %s of %s/%s ignored", i.kind, i.event_id, i.channel,
                     i.bot_id)
            return
        await call_next(context)

    async def step_receipts(self, context: EventContext, call_next: Next) -> None:
        """Delivered/read/failed receipts update message status and stop here."""
        i, session = context.inbound, context.session
        assert session is not None
        if not i.is_status:
            await call_next(context)
            return
        status = {InboundKind.DELIVERED: MessageStatus.DELIVERED,
                  InboundKind.READ: MessageStatus.READ,
                  InboundKind.FAILED: MessageStatus.FAILED}[i.kind]
        query = select(Message).join(Subscriber, Subscriber.id == Message.subscriber_id).where(
            Subscriber.channel == i.channel, Subscriber.bot_id == i.bot_id,
            Subscriber.user_id == i.user_id, Message.direction == "out")
        if i.message_ids:
            query = query.where(Message.channel_message_id.in_(i.message_ids))
        elif i.watermark is not None:
            query = query.where(Message.created_at <= i.watermark,
                                Message.status.in_((MessageStatus.SENT, MessageStatus.DELIVERED)))
        else:
            return
        now = self.clock.now()
        for message in (await session.scalars(query)).all():
            if status == MessageStatus.FAILED or STATUS_RANK.get(status, 0) > STATUS_RANK.get(
                    message.status, -1):
                message.status, message.updated_at = status, now
                if status == MessageStatus.FAILED:
                    message.error = str(i.data.get("reason") or "reported failed")

    async def step_upsert_subscriber(self, context: EventContext, call_next: Next) -> None:
        """Read (or create) the subscriber and whether humans own the chat, in one
        statement; what the event changes on them is written once, after the chain."""
        i, connection = context.inbound, context.connection
        assert connection is not None
        now = self.clock.now()
        found = context.prefetched
        if found is NOT_READ:
            found = (await connection.execute(SELECT_SUBSCRIBER, {
                "b_channel": i.channel, "b_bot": i.bot_id, "b_user": i.user_id})).first()
        assert found is None or isinstance(found, dict)
        context.new_subscriber = found is None
        profile = i.profile
        # PostgreSQL, no phone to link: the contact and the subscriber in one statement.
        paired = found is None and not profile.phone and connection.adapter is not None
        if found is None:
            contact_id = None if paired else (await connection.execute(INSERT_CONTACT, {
                "phone": profile.phone, "created_at": now})).scalar()
            subscriber = SubscriberRow({
                "contact_id": contact_id, "channel": i.channel, "bot_id": i.bot_id,
                "user_id": i.user_id, "status": SubscriberStatus.SUBSCRIBED, "attributes": {},
                "created_at": now, "updated_at": now})
        else:
            subscriber = SubscriberRow(found)
            context.conversation_id = found["open_conversation"]
        for name in ("first_name", "last_name", "username"):
            value = getattr(profile, name)
            if value and getattr(subscriber, name) != value:
                setattr(subscriber, name, value)
        if i.ref and not subscriber.source_ref:
            subscriber.source_ref = i.ref
        if i.kind == InboundKind.UNSUBSCRIBED:
            subscriber.status = SubscriberStatus.UNSUBSCRIBED
        elif i.kind in USER_KINDS:
            subscriber.status = SubscriberStatus.SUBSCRIBED
            subscriber.last_inbound_at = now
        if profile.phone:
            await self._link_phone(connection, subscriber, profile.phone)
        subscriber.updated_at = now
        if found is None:
            values = {name: getattr(subscriber, name) for name in SUBSCRIBER_COLUMNS
                      if name != "id"}
            if paired:
                del values["contact_id"]
                subscriber.id, subscriber.contact_id = (await connection.execute(
                    linked_pair(CONTACTS, _NEW_CONTACT, SUBSCRIBERS, tuple(values),
                                "contact_id"),
                    {"p_phone": None, "p_created_at": now,
                     **{f"c_{name}": value for name, value in values.items()}})).rows[0]
            else:
                subscriber.id = (await connection.execute(INSERT_SUBSCRIBER, values)).scalar()
            subscriber.changed.clear()
        context.subscriber = subscriber
        set_log_field("subscriber_id", subscriber.id)
        await call_next(context)
        await write_subscriber(connection, subscriber)

    async def _link_phone(self, connection: Direct, subscriber: SubscriberRow,
                          phone: str) -> None:
        """A shared phone number links channel identities to one contact."""
        attributes = dict(subscriber.attributes or {})
        attributes["phone"] = phone
        subscriber.attributes = attributes
        other = (await connection.execute(OTHER_CONTACT, {
            "b_phone": phone, "b_id": subscriber.contact_id})).scalar()
        if other is not None:
            subscriber.contact_id = other
        else:
            await connection.execute(SET_CONTACT_PHONE, {
                "b_phone": phone, "b_id": subscriber.contact_id})

    async def step_referral(self, context: EventContext, call_next: Next) -> None:
        """A new subscriber who came through a referral link credits the referrer."""
        from bot_platform.games import credit_referral

        subscriber, session = context.subscriber, context.session
        assert subscriber is not None and session is not None
        if context.new_subscriber and context.inbound.ref:
            await credit_referral(session, ref=context.inbound.ref,
                                  subscriber_id=subscriber.id,
                                  contact_id=subscriber.contact_id, now=self.clock.now())
        await call_next(context)

    async def step_locale(self, context: EventContext, call_next: Next) -> None:
        subscriber = context.subscriber
        assert subscriber is not None
        chosen = (subscriber.attributes or {}).get("locale_chosen")
        if chosen:
            subscriber.locale = chosen
        elif subscriber.locale is None or context.inbound.profile.language:
            subscriber.locale = self.catalogs.resolve_locale(context.inbound.profile.language)
        await call_next(context)

    async def step_record_inbound(self, context: EventContext, call_next: Next) -> None:
        i, connection, subscriber = context.inbound, context.connection, context.subscriber
        assert connection is not None and subscriber is not None
        if i.kind in RECORDED_KINDS:
            now = self.clock.now()
            await connection.write(INSERT_MESSAGE, {
                "subscriber_id": subscriber.id, "channel": i.channel, "direction": "in",
                "kind": i.kind.value, "text": i.text,
                "payload": {"payload": i.payload, "ref": i.ref, **i.data} if (
                    i.payload or i.ref or i.data) else None,
                "status": "received", "created_at": now, "updated_at": now})
        await call_next(context)

    async def step_handoff(self, context: EventContext, call_next: Next) -> None:
        """While humans own the chat, messages go to the conversation, not to flows."""
        connection = context.connection
        assert connection is not None
        if context.conversation_id is None or context.inbound.kind == InboundKind.UNSUBSCRIBED:
            await call_next(context)
            return
        await connection.write(TOUCH_CONVERSATION, {
            "b_id": context.conversation_id, "b_now": self.clock.now()})

    async def step_flows(self, context: EventContext, call_next: Next) -> None:
        session, subscriber = context.session, context.subscriber
        assert session is not None and subscriber is not None
        if subscriber.status == SubscriberStatus.SUBSCRIBED:  # and no human on it: see step_handoff
            work = await self.turns.load(session, subscriber, checked=True)
            assert not isinstance(work, str)
            await self.router.route_inbound(work.turn, context.inbound)
            context.queued.extend(await work.save(hold=context.hold, in_reply=True,
                                                  claim=context.claim))
        await call_next(context)

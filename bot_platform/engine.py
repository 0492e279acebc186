"""The engine: every inbound event, timer and shop event runs through here.

``Engine.handle(inbound)`` runs a chain of small steps (aiogram-style middleware):

    log errors -> per-subscriber lock -> transaction -> dedupe -> receipts ->
    upsert subscriber -> locale -> record inbound -> flows

Everything an event changes (subscriber, flow positions, outbox rows, timers, the dedupe
marker) is written in ONE transaction, so a crash leaves either all of it or none.
Events of one subscriber are serialized by an in-process lock (FIFO) and, on PostgreSQL,
a transaction-scoped advisory lock, so several processes keep the order too.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from bot_platform.channels import HandledEvent
from bot_platform.clock import Clock
from bot_platform.database import Database, insert_ignore
from bot_platform.errors import StorageUnavailable
from bot_platform.flow_runtime import (
    Escalation,
    FlowSet,
    JobEffect,
    Position,
    SendEffect,
    TimerEffect,
    Turn,
)
from bot_platform.i18n import Catalogs
from bot_platform.logs import log_context, set_log_field
from bot_platform.metrics import Metrics
from bot_platform.models import (
    Answer,
    Contact,
    Conversation,
    CustomerEvent,
    FlowState,
    Job,
    Message,
    Outbox,
    ProcessedEvent,
    Subscriber,
    SubscriberTag,
)
from bot_platform.privacy import event_key
from bot_platform.text import storable, storable_json, storable_or_none
from bot_platform.types import Capabilities, Inbound, InboundKind, Outgoing, fit_message

log = logging.getLogger(__name__)

OPEN_CONVERSATION = ("waiting", "assigned")
DEFAULT_HANDOFF_KEYWORDS = {
    "en": ["operator", "human", "agent", "talk to a human", "talk to a person"],
    "uk": ["оператор", "людина", "менеджер"],
    "pl": ["konsultant", "człowiek", "operator"],
    "ar": ["موظف", "إنسان", "خدمة العملاء"],
}
MAX_FLOW_STARTS = 8  # start_flow chains per event before we call it a loop
STATUS_RANK = {"queued": 0, "sent": 1, "delivered": 2, "read": 3}
USER_KINDS = {InboundKind.TEXT, InboundKind.BUTTON, InboundKind.START, InboundKind.CONTACT,
              InboundKind.MEDIA, InboundKind.REFERRAL, InboundKind.SUBSCRIBED}


class KeyedLocks:
    """One FIFO ``asyncio.Lock`` per key, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[Any, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, key: Any) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users <= 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


@dataclass(frozen=True, slots=True)
class SupportHours:
    """When agents answer: weekdays (0 = Monday) and hours in a time zone."""

    days: tuple[int, ...] = (0, 1, 2, 3, 4)
    start_hour: int = 9
    end_hour: int = 18
    timezone: str = "UTC"

    def _local(self, moment: datetime) -> datetime:
        from zoneinfo import ZoneInfo

        return moment.astimezone(ZoneInfo(self.timezone))

    def open_at(self, moment: datetime) -> bool:
        local = self._local(moment)
        return local.weekday() in self.days and self.start_hour <= local.hour < self.end_hour

    def next_opening(self, moment: datetime) -> str:
        """When agents are next in, as "Mon 09:00" in the support time zone."""
        local = self._local(moment).replace(minute=0, second=0, microsecond=0)
        for _ in range(24 * 8):
            local += timedelta(hours=1)
            if local.weekday() in self.days and local.hour == self.start_hour:
                return local.strftime("%a %H:%M")
        return ""


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


WORK_CHANNEL = "botp_work"  # PostgreSQL NOTIFY channel: "messages were queued"


async def notify_workers(session: AsyncSession) -> None:
    """Wake worker processes (``LISTEN botp_work``) when this transaction commits; with
    SQLite, the worker is in this process and ``on_commit`` wakes it."""
    if session.bind.dialect.name == "postgresql":
        await session.execute(text(f"NOTIFY {WORK_CHANNEL}"))


def storable_inbound(inbound: Inbound) -> Inbound:
    """The event with every text storable and cut to its column (names over 255
    characters, NUL, unpaired surrogates): a messenger re-sends an update we fail on
    forever, so what it sends is made storable rather than refused."""
    profile = inbound.profile
    return inbound.model_copy(update={
        "channel": storable(inbound.channel, 32), "bot_id": storable(inbound.bot_id, 64),
        "user_id": storable(inbound.user_id, 128), "event_id": storable(inbound.event_id, 255),
        "text": storable_or_none(inbound.text), "payload": storable_or_none(inbound.payload),
        "ref": storable_or_none(inbound.ref, 255),
        "message_ids": tuple(storable(m, 255) for m in inbound.message_ids),
        "data": storable_json(inbound.data),
        "profile": profile.model_copy(update={
            "first_name": storable_or_none(profile.first_name, 255),
            "last_name": storable_or_none(profile.last_name, 255),
            "username": storable_or_none(profile.username, 255),
            "language": storable_or_none(profile.language, 16),
            "phone": storable_or_none(profile.phone, 32)})})


def advisory_key(*parts: str) -> int:
    """A signed 64-bit key for ``pg_advisory_xact_lock``."""
    digest = hashlib.blake2b("\x1f".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


@dataclass
class EventContext:
    """What the steps of the inbound chain share."""

    inbound: Inbound
    session: AsyncSession | None = None
    subscriber: Subscriber | None = None
    duplicate: bool = False
    queued: list[tuple[int, Outgoing]] = field(default_factory=list)
    hold: timedelta | None = None
    new_subscriber: bool = False


Next = Callable[[EventContext], Awaitable[None]]
Step = Callable[[EventContext, Next], Awaitable[None]]


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
    ) -> None:
        self.db = db
        self.flows = flows
        self.catalogs = catalogs
        self.clock = clock
        self.capabilities = capabilities
        self.on_commit = on_commit or (lambda: None)
        self.public_url: str | None = None  # where tracked links redirect through /r/
        self.random = random.Random()  # games draw from this (tests may seed it)
        # Typed words (per locale, "*" for all) that hand the chat to a human.
        self.handoff_keywords: dict[str, list[str]] = dict(DEFAULT_HANDOFF_KEYWORDS)
        # When humans answer; outside these hours the customer is told when they will.
        self.support_hours: SupportHours | None = None
        # A job kind that answers unexpected text (AI); None: the catalog's fallback.
        self.text_fallback_job: str | None = None
        # Called for a customer message that went to an open conversation (live updates).
        self.on_conversation_message: Callable[[int, Inbound], None] | None = None
        self.locks = KeyedLocks()
        self.metrics = Metrics()  # the platform hands in its own (bot_platform.metrics)
        self.steps: list[Step] = [
            self.step_log_errors, self.step_lock, self.step_transaction, self.step_dedupe,
            self.step_receipts, self.step_upsert_subscriber, self.step_referral,
            self.step_locale,
            self.step_record_inbound, self.step_handoff, self.step_flows,
        ]

    # ---- the inbound chain ------------------------------------------------------------

    async def handle(self, inbound: Inbound, hold: timedelta | None = None) -> HandledEvent:
        """Process one inbound event exactly once (re-deliveries are no-ops).

        ``hold`` keeps the messages it queues from the worker for that long (or until
        ``release`` is called), so a webhook can answer with one of them itself."""
        context = EventContext(storable_inbound(inbound), hold=hold)
        self.metrics.inbound_event(context.inbound.channel, str(context.inbound.kind))
        with log_context(bot=context.inbound.bot_id, channel=context.inbound.channel):
            await self._run(0, context)
        return HandledEvent(
            inbound=inbound, duplicate=context.duplicate,
            outbox_ids=tuple(i for i, _ in context.queued),
            replies=tuple(m for _, m in context.queued))

    async def _run(self, index: int, context: EventContext) -> None:
        if index < len(self.steps):
            await self.steps[index](context, lambda ctx: self._run(index + 1, ctx))

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

    async def step_lock(self, context: EventContext, call_next: Next) -> None:
        i = context.inbound
        async with self.locks.hold((i.channel, i.bot_id, i.user_id)):
            await call_next(context)

    async def step_transaction(self, context: EventContext, call_next: Next) -> None:
        i = context.inbound
        async with self.db.session() as session:
            context.session = session
            await self.advisory_lock(session, i.channel, i.bot_id, i.user_id)
            await call_next(context)
            if context.queued and context.hold is None:
                await notify_workers(session)
        if context.hold is None:
            self.on_commit()

    async def step_dedupe(self, context: EventContext, call_next: Next) -> None:
        i, session = context.inbound, context.session
        assert session is not None
        result = await session.execute(insert_ignore(session, ProcessedEvent).values(
            channel=i.channel, bot_id=i.bot_id, event_id=event_key(i.event_id),
            processed_at=self.clock.now()))
        if result.rowcount == 0:
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
        status = {InboundKind.DELIVERED: "delivered", InboundKind.READ: "read",
                  InboundKind.FAILED: "failed"}[i.kind]
        query = select(Message).join(Subscriber, Subscriber.id == Message.subscriber_id).where(
            Subscriber.channel == i.channel, Subscriber.bot_id == i.bot_id,
            Subscriber.user_id == i.user_id, Message.direction == "out")
        if i.message_ids:
            query = query.where(Message.channel_message_id.in_(i.message_ids))
        elif i.watermark is not None:
            query = query.where(Message.created_at <= i.watermark,
                                Message.status.in_(("sent", "delivered")))
        else:
            return
        now = self.clock.now()
        for message in (await session.scalars(query)).all():
            if status == "failed" or STATUS_RANK.get(status, 0) > STATUS_RANK.get(
                    message.status, -1):
                message.status, message.updated_at = status, now
                if status == "failed":
                    message.error = str(i.data.get("reason") or "reported failed")

    async def step_upsert_subscriber(self, context: EventContext, call_next: Next) -> None:
        i, session = context.inbound, context.session
        assert session is not None
        now = self.clock.now()
        subscriber = await session.scalar(select(Subscriber).where(
            Subscriber.channel == i.channel, Subscriber.bot_id == i.bot_id,
            Subscriber.user_id == i.user_id))
        context.new_subscriber = subscriber is None
        if subscriber is None:
            contact = Contact(phone=i.profile.phone, created_at=now)
            session.add(contact)
            await session.flush()
            subscriber = Subscriber(
                contact_id=contact.id, channel=i.channel, bot_id=i.bot_id, user_id=i.user_id,
                status="subscribed", attributes={}, created_at=now, updated_at=now)
            session.add(subscriber)
        profile = i.profile
        for name in ("first_name", "last_name", "username"):
            value = getattr(profile, name)
            if value and getattr(subscriber, name) != value:
                setattr(subscriber, name, value)
        if i.ref and not subscriber.source_ref:
            subscriber.source_ref = i.ref
        if i.kind == InboundKind.UNSUBSCRIBED:
            subscriber.status = "unsubscribed"
        elif i.kind in USER_KINDS:
            subscriber.status = "subscribed"
            subscriber.last_inbound_at = now
        if profile.phone:
            await self._link_phone(session, subscriber, profile.phone)
        subscriber.updated_at = now
        await session.flush()
        context.subscriber = subscriber
        set_log_field("subscriber_id", subscriber.id)
        await call_next(context)

    async def _link_phone(self, session: AsyncSession, subscriber: Subscriber,
                          phone: str) -> None:
        """A shared phone number links channel identities to one contact."""
        attributes = dict(subscriber.attributes or {})
        attributes["phone"] = phone
        subscriber.attributes = attributes
        other = await session.scalar(select(Contact).where(
            Contact.phone == phone, Contact.id != subscriber.contact_id).limit(1))
        if other is not None:
            subscriber.contact_id = other.id
        else:
            contact = await session.get(Contact, subscriber.contact_id)
            if contact is not None:
                contact.phone = phone

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
        i, session, subscriber = context.inbound, context.session, context.subscriber
        assert session is not None and subscriber is not None
        if i.kind in (InboundKind.TEXT, InboundKind.BUTTON, InboundKind.CONTACT,
                      InboundKind.MEDIA, InboundKind.START):
            now = self.clock.now()
            session.add(Message(
                subscriber_id=subscriber.id, channel=i.channel, direction="in",
                kind=i.kind.value, text=i.text,
                payload={"payload": i.payload, "ref": i.ref, **i.data} if (
                    i.payload or i.ref or i.data) else None,
                status="received", created_at=now, updated_at=now))
        await call_next(context)

    async def step_handoff(self, context: EventContext, call_next: Next) -> None:
        """While humans own the chat, messages go to the conversation, not to flows."""
        session, subscriber = context.session, context.subscriber
        assert session is not None and subscriber is not None
        conversation = await self.open_conversation(session, subscriber.id)
        if conversation is None or context.inbound.kind == InboundKind.UNSUBSCRIBED:
            await call_next(context)
            return
        conversation.updated_at = self.clock.now()
        if self.on_conversation_message is not None:
            self.on_conversation_message(conversation.id, context.inbound)

    async def open_conversation(self, session: AsyncSession,
                                subscriber_id: int) -> Conversation | None:
        return await session.scalar(select(Conversation).where(
            Conversation.subscriber_id == subscriber_id,
            Conversation.status.in_(OPEN_CONVERSATION)).limit(1))

    async def step_flows(self, context: EventContext, call_next: Next) -> None:
        session, subscriber = context.session, context.subscriber
        assert session is not None and subscriber is not None
        if subscriber.status == "subscribed":
            turn, rows = await self.load_turn(session, subscriber)
            await self.route_inbound(turn, context.inbound)
            context.queued.extend(await self.save_turn(session, subscriber, turn, rows,
                                                       hold=context.hold, in_reply=True))
        await call_next(context)

    # ---- routing --------------------------------------------------------------------

    async def route_inbound(self, turn: Turn, inbound: Inbound) -> None:
        """Decide which flow trigger an inbound event fires."""
        kind = inbound.kind
        if kind in (InboundKind.START, InboundKind.REFERRAL):
            names = self.flows.triggered_by("ref", inbound.ref) if inbound.ref else []
            if not names and kind == InboundKind.START:
                names = self.flows.triggered_by("start")
            turn.pending_starts.extend(names)
        elif kind == InboundKind.SUBSCRIBED:
            turn.pending_starts.extend(self.flows.triggered_by("subscribed"))
        elif kind == InboundKind.BUTTON:
            await self._route_button(turn, inbound.payload)
        elif kind == InboundKind.TEXT:
            await self._route_text(turn, inbound.text or "")
        elif kind == InboundKind.CONTACT and inbound.profile.phone:
            await self._route_capture(turn, inbound.profile.phone, only_type="phone")
        await self.run_pending_starts(turn)

    async def _route_button(self, turn: Turn, payload: str | None) -> None:
        ref = self.flows.codec.decode(payload)
        if ref is None or ref.flow not in self.flows:
            log.info("button payload %r matches no flow; ignored", payload)
            return
        flow = self.flows[ref.flow]
        if ref.state not in flow.spec.states:
            log.info("button of removed state %s/%s ignored", ref.flow, ref.state)
            return
        position = turn.positions.setdefault(ref.flow, Position(ref.flow, ref.state))
        # An older message's button still works: it acts from the state that showed it.
        position.state = ref.state
        await flow.fire(turn, position, f"{ref.kind}_{ref.index}")

    def _active(self, turn: Turn) -> list[Position]:
        active = [p for p in turn.positions.values()
                  if p.status == "active" and p.flow in self.flows]
        return sorted(active, key=lambda p: p.updated_at or turn.now, reverse=True)

    async def _route_capture(self, turn: Turn, text: str,
                             only_type: str | None = None) -> bool:
        for position in self._active(turn):
            flow = self.flows[position.flow]
            state = flow.spec.states.get(position.state)
            if state is None or state.capture is None:
                continue
            if only_type and state.capture.type != only_type:
                continue
            if not await flow.fire(turn, position, "captured", text=text):
                retry = self.catalogs.format(turn.locale, state.capture.retry,
                                             turn.variables(self.catalogs))
                turn.effects.append(SendEffect(position.flow, Outgoing(text=retry)))
            return True
        return False

    async def _route_text(self, turn: Turn, text: str) -> None:
        if self._asks_for_human(turn.locale, text):
            turn.escalation = Escalation("asked_for_human", text[:500], {"text": text})
            return
        for position in self._active(turn):
            flow = self.flows[position.flow]
            match = flow.label_index(position.state, text, turn)
            if match is not None:
                await flow.fire(turn, position, f"{match[0]}_{match[1]}")
                return
        if await self._route_capture(turn, text):
            return
        names = self.flows.triggered_by("keyword", text)
        if names:
            turn.pending_starts.extend(names)
            return
        if self.text_fallback_job is not None:
            # Answered outside this transaction (it may call a model): see jobs.py.
            turn.effects.append(JobEffect(self.text_fallback_job,
                                          {"text": text, "locale": turn.locale}, turn.now))
            return
        turn.effects.extend(self.off_script(turn))

    async def release(self, outbox_ids: Sequence[int]) -> None:
        """Hand held messages to the worker now."""
        if outbox_ids:
            async with self.db.session() as session:
                await session.execute(update(Outbox).where(
                    Outbox.id.in_(outbox_ids), Outbox.status == "pending",
                ).values(next_attempt_at=self.clock.now()))
                await notify_workers(session)
        self.on_commit()

    def _asks_for_human(self, locale: str, text: str) -> bool:
        words = self.handoff_keywords.get(locale, []) + self.handoff_keywords.get("*", [])
        wanted = text.strip().casefold().rstrip("!?.")
        return bool(wanted) and wanted in {w.casefold() for w in words}

    def off_script(self, turn: Turn) -> list[SendEffect]:
        """Text that fits nothing. Mid-question the customer is asked again (the question
        with its buttons, and how to reach a person) instead of being sent back to the
        start; outside any question, the catalog's fallback."""
        active = self._active(turn)
        if active:
            position = active[0]
            flow = self.flows[position.flow]
            messages = flow.render(position.state, turn) if flow.waits_for_choice(
                position.state) else []
            if messages:
                question = messages[-1]
                hint = self.reask_hint(turn)
                if question.text and not question.image_url:
                    return [SendEffect(position.flow, question.model_copy(
                        update={"text": f"{hint}\n\n{question.text}"}))]
                return [SendEffect(None, Outgoing(text=hint)),
                        SendEffect(position.flow, question)]
        return [SendEffect(None, self.fallback_message(turn))]

    def reask_hint(self, turn: Turn) -> str:
        """"Please choose one of the options", naming a word that reaches a person."""
        words = (self.handoff_keywords.get(turn.locale)
                 or self.handoff_keywords.get("*") or [])
        variables = {**turn.variables(self.catalogs)}
        if words:
            variables["keyword"] = words[0]
            return self.catalogs.format(turn.locale, "common-reask", variables)
        return self.catalogs.format(turn.locale, "common-reask-plain", variables)

    def fallback_message(self, turn: Turn) -> Outgoing:
        """The localized "I did not get that"."""
        return Outgoing(text=self.catalogs.format(turn.locale, "common-fallback",
                                                  turn.variables(self.catalogs)))

    async def run_pending_starts(self, turn: Turn) -> None:
        for _ in range(MAX_FLOW_STARTS):
            if not turn.pending_starts:
                return
            name = turn.pending_starts.popleft()
            if name not in self.flows:
                log.warning("start of unknown flow %r ignored", name)
                continue
            flow = self.flows[name]
            position = turn.positions.setdefault(name, Position(name, flow.spec.start))
            await flow.start(turn, position)
        if turn.pending_starts:
            log.warning("more than %d flow starts in one event; the rest were dropped",
                        MAX_FLOW_STARTS)
            turn.pending_starts.clear()

    # ---- timers and shop events ---------------------------------------------------------

    async def run_flow_timer(self, session: AsyncSession, job: Job) -> str:
        """Fire a flow timer inside the caller's transaction; returns what happened."""
        subscriber = await session.get(Subscriber, job.subscriber_id)
        if subscriber is None:
            return "no-subscriber"
        if subscriber.status != "subscribed":
            return "unsubscribed"
        if await self.open_conversation(session, subscriber.id) is not None:
            return "suppressed"  # humans own the chat: the chain must not interrupt them
        turn, rows = await self.load_turn(session, subscriber)
        position = turn.positions.get(job.flow or "")
        payload = job.payload
        if (position is None or position.status != "active"
                or position.state != payload.get("state")
                or position.version != payload.get("version")
                or job.flow not in self.flows):
            return "stale"
        if not await self.flows[job.flow].fire(turn, position, "timeout"):
            return "not-applicable"
        await self.run_pending_starts(turn)
        await self.save_turn(session, subscriber, turn, rows)
        return "fired"

    async def dispatch_event(
        self, subscriber_id: int | None, name: str, data: dict[str, Any] | None = None, *,
        external_id: str | None = None, occurred_at: datetime | None = None,
        contact_id: int | None = None, start_flows: Sequence[str] | None = None,
    ) -> tuple[bool, list[int]]:
        """Record a shop event and let the subscriber's flows react: start flows triggered
        by it, move flows waiting for it. Returns (stored, outbox ids); stored is False
        when an event with the same ``external_id`` was recorded before."""
        key: tuple[str, str, str] | None = None
        if subscriber_id is not None:
            async with self.db.session() as session:
                subscriber = await session.get(Subscriber, subscriber_id)
                if subscriber is not None:
                    key = (subscriber.channel, subscriber.bot_id, subscriber.user_id)
                    contact_id = contact_id or subscriber.contact_id
        async with AsyncExitStack() as stack:
            if key is not None:
                await stack.enter_async_context(self.locks.hold(key))
            session = await stack.enter_async_context(self.db.session())
            if key is not None:
                await self.advisory_lock(session, *key)
            now = self.clock.now()
            stored = await session.execute(insert_ignore(session, CustomerEvent).values(
                external_id=external_id, name=name, contact_id=contact_id,
                subscriber_id=subscriber_id if key else None, data=data or {},
                occurred_at=occurred_at or now, created_at=now))
            if stored.rowcount == 0:
                return False, []
            if key is None:
                return True, []
            subscriber = await session.get(Subscriber, subscriber_id, populate_existing=True)
            if (subscriber is None or subscriber.status != "subscribed"
                    or await self.open_conversation(session, subscriber.id) is not None):
                return True, []
            turn, rows = await self.load_turn(session, subscriber)
            if data:
                turn.attributes.update(event_attributes(name, data))
                turn.attributes_changed = True
            for position in self._active(turn):
                await self.flows[position.flow].fire(turn, position, f"event:{name}")
            turn.pending_starts.extend(
                self.flows.triggered_by("event", name) if start_flows is None else start_flows)
            await self.run_pending_starts(turn)
            queued = await self.save_turn(session, subscriber, turn, rows)
            if queued:
                await notify_workers(session)
        self.on_commit()
        return True, [i for i, _ in queued]

    # ---- loading and saving a turn ------------------------------------------------------

    async def advisory_lock(self, session: AsyncSession, *identity: str) -> None:
        if session.bind.dialect.name == "postgresql":
            await session.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                                  {"key": advisory_key(*identity)})

    async def load_turn(self, session: AsyncSession,
                        subscriber: Subscriber) -> tuple[Turn, dict[str, FlowState]]:
        rows = {row.flow: row for row in (await session.scalars(
            select(FlowState).where(FlowState.subscriber_id == subscriber.id))).all()}
        tags = set((await session.scalars(select(SubscriberTag.tag).where(
            SubscriberTag.subscriber_id == subscriber.id))).all())
        turn = Turn(
            subscriber_id=subscriber.id, contact_id=subscriber.contact_id,
            channel=subscriber.channel,
            locale=subscriber.locale or self.catalogs.default_locale, now=self.clock.now(),
            attributes=dict(subscriber.attributes or {}), tags=set(tags),
            original_tags=tags,
            profile={"first_name": subscriber.first_name, "last_name": subscriber.last_name,
                     "username": subscriber.username},
            positions={flow: Position(flow, row.state, row.version, row.status,
                                      dict(row.data or {}), row.updated_at)
                       for flow, row in rows.items()},
            session=session, services=self,
        )
        return turn, rows

    async def save_turn(self, session: AsyncSession, subscriber: Subscriber, turn: Turn,
                        rows: dict[str, FlowState], hold: timedelta | None = None,
                        in_reply: bool = False) -> list[tuple[int, Outgoing]]:
        """Persist a turn: positions, tags, attributes, timers and outbox rows.

        ``in_reply``: the turn handles the customer's message, so what it sends answers it
        (``Outgoing.in_reply``); timers and shop events send proactively."""
        now = turn.now
        for flow, position in turn.positions.items():
            if not position.changed:
                continue
            row = rows.get(flow)
            left_timer = row is not None and self._may_have_timer(flow, row.state)
            if row is None:
                session.add(FlowState(
                    subscriber_id=subscriber.id, flow=flow, state=position.state,
                    version=position.version, status=position.status, data=position.data,
                    created_at=now, updated_at=now))
            else:
                row.state, row.version, row.status = (position.state, position.version,
                                                      position.status)
                row.data, row.updated_at = position.data, now
            if not left_timer:
                continue
            # Timers of the state instance this subscriber just left are void.
            await session.execute(update(Job).where(
                Job.subscriber_id == subscriber.id, Job.flow == flow,
                Job.kind == "flow_timer", Job.status == "pending",
            ).values(status="cancelled", finished_at=now, result="state-left"))
        original = turn.original_tags
        for tag in turn.tags - original:
            session.add(SubscriberTag(subscriber_id=subscriber.id, tag=tag))
        removed = original - turn.tags
        if removed:
            await session.execute(delete(SubscriberTag).where(
                SubscriberTag.subscriber_id == subscriber.id, SubscriberTag.tag.in_(removed)))
        if turn.attributes_changed:
            subscriber.attributes = dict(turn.attributes)
            subscriber.updated_at = now
        if turn.locale != (subscriber.locale or self.catalogs.default_locale):
            subscriber.locale = turn.locale
        for flow, question, value in turn.answers:
            session.add(Answer(subscriber_id=subscriber.id, flow=flow, question=question,
                               value=value, created_at=now))
        for effect in turn.effects:
            if isinstance(effect, TimerEffect):
                position = turn.positions[effect.flow]
                if position.status == "active" and position.version == effect.version:
                    session.add(Job(kind="flow_timer", subscriber_id=subscriber.id,
                                    flow=effect.flow, due_at=effect.due_at, created_at=now,
                                    payload={"state": effect.state,
                                             "version": effect.version}))
            elif isinstance(effect, JobEffect):
                session.add(Job(kind=effect.kind, subscriber_id=subscriber.id,
                                due_at=effect.due_at, created_at=now, payload=effect.payload))
        effects = [e for e in turn.effects if isinstance(e, SendEffect)]
        sends = [(e.flow, e.message) for e in effects]
        if turn.escalation is not None:
            sends.extend(await self.escalate(session, subscriber, turn))
        if in_reply:
            sends = [(flow, m.model_copy(update={"in_reply": True})) for flow, m in sends]
        queued = await self.enqueue(session, subscriber, sends, hold=hold)
        if any(e.fallback for e in effects):
            await self._schedule_fallbacks(session, subscriber, effects, queued, now)
        return queued

    def _may_have_timer(self, flow: str, state: str) -> bool:
        """Whether a subscriber in ``state`` may have a pending timer: only states with
        ``after`` schedule one (a state unknown to the flow's current version may too)."""
        if flow not in self.flows:
            return True
        spec = self.flows[flow].spec.states.get(state)
        return spec is None or spec.after is not None

    async def _schedule_fallbacks(self, session: AsyncSession, subscriber: Subscriber,
                                  effects: list[SendEffect],
                                  queued: list[tuple[int, Outgoing]], now: datetime) -> None:
        """A job per message with a channel fallback, pointing at its first queued part."""
        caps = self.capabilities(subscriber.channel, subscriber.bot_id)
        position = 0
        for effect in effects:
            parts = len(fit_message(effect.message, caps))
            first_outbox_id = queued[position][0]
            position += parts
            if effect.fallback is None:
                continue
            delay, channel = effect.fallback
            session.add(Job(kind="read_fallback", subscriber_id=subscriber.id,
                            flow=effect.flow, due_at=now + delay, created_at=now, payload={
                                "outbox_id": first_outbox_id, "channel": channel,
                                "message": effect.message.model_dump(mode="json")}))

    async def run_read_fallback(self, session: AsyncSession, job: Job) -> str:
        """The fallback timer: resend through another channel unless the message was read
        (or answered or clicked, where the messenger reports no reads)."""
        original = await session.get(Outbox, job.payload.get("outbox_id"))
        subscriber = await session.get(Subscriber, job.subscriber_id)
        if original is None or subscriber is None:
            return "gone"
        message = await session.get(Message, original.message_id)
        engaged = message is not None and (message.status == "read" or (
            subscriber.last_inbound_at is not None
            and subscriber.last_inbound_at > message.created_at))
        if engaged:
            return "read"
        preferred = job.payload.get("channel")
        other = await session.scalar(
            select(Subscriber).where(
                Subscriber.contact_id == subscriber.contact_id, Subscriber.id != subscriber.id,
                Subscriber.status == "subscribed")
            .order_by((Subscriber.channel == (preferred or "")).desc(),
                      (Subscriber.channel != subscriber.channel).desc(),
                      Subscriber.last_inbound_at.desc().nulls_last(), Subscriber.id)
            .limit(1))
        if other is None:
            return "no-other-channel"
        if await self.open_conversation(session, other.id) is not None:
            return "suppressed"
        await self.enqueue(session, other, [(job.flow, Outgoing.model_validate(
            job.payload["message"]))])
        return f"sent-via-{other.channel}"

    async def escalate(self, session: AsyncSession, subscriber: Subscriber,
                       turn: Turn) -> list[tuple[str | None, Outgoing]]:
        """Open a conversation waiting for an agent (once) and tell the customer."""
        escalation = turn.escalation
        assert escalation is not None
        if await self.open_conversation(session, subscriber.id) is not None:
            return []
        now = turn.now
        session.add(Conversation(
            subscriber_id=subscriber.id, status="waiting", reason=escalation.reason,
            summary=escalation.summary, data=escalation.data, created_at=now,
            updated_at=now))
        key, variables = "handoff-waiting", turn.variables(self.catalogs)
        if self.support_hours is not None and not self.support_hours.open_at(now):
            key = "handoff-waiting-closed"
            variables = {**variables, "opens": self.support_hours.next_opening(now)}
        if not self.catalogs.has(self.catalogs.default_locale, key):
            return []
        return [(None, Outgoing(text=self.catalogs.format(turn.locale, key, variables)))]

    async def enqueue(self, session: AsyncSession, subscriber: Subscriber,
                      messages: Sequence[tuple[str | None, Outgoing]],
                      broadcast_id: int | None = None, hold: timedelta | None = None
                      ) -> list[tuple[int, Outgoing]]:
        """Queue messages for delivery (fitted to the channel) in the caller's transaction."""
        [queued] = await self.enqueue_many(session, [(subscriber, messages)],
                                           broadcast_id=broadcast_id, hold=hold)
        return queued

    async def enqueue_many(
        self, session: AsyncSession,
        items: Sequence[tuple[Subscriber, Sequence[tuple[str | None, Outgoing]]]],
        broadcast_id: int | None = None, hold: timedelta | None = None,
    ) -> list[list[tuple[int, Outgoing]]]:
        """``enqueue`` for many subscribers at once (a broadcast batch): two bulk inserts
        in all instead of two flushes per subscriber. Subscribers may be ORM objects or
        rows with the same attributes. Returns the queued rows per item."""
        now = self.clock.now()
        parts: list[tuple[int, Any, str | None, Outgoing]] = []
        for index, (subscriber, messages) in enumerate(items):
            caps = self.capabilities(subscriber.channel, subscriber.bot_id)
            parts.extend((index, subscriber, flow, part) for flow, message in messages
                         for part in fit_message(message, caps))
        queued: list[list[tuple[int, Outgoing]]] = [[] for _ in items]
        if not parts:
            return queued
        message_ids = await _insert_returning_ids(session, Message, [{
                "subscriber_id": subscriber.id, "channel": subscriber.channel,
                "direction": "out", "kind": "cards" if part.cards else "text",
                "text": part.text or None, "status": "queued", "flow": flow,
                "broadcast_id": broadcast_id, "created_at": now, "updated_at": now}
                for _, subscriber, flow, part in parts])
        outbox_ids = await _insert_returning_ids(session, Outbox, [{
                "subscriber_id": subscriber.id, "message_id": message_id,
                "channel": subscriber.channel, "bot_id": subscriber.bot_id,
                "recipient": subscriber.user_id, "payload": part.model_dump(mode="json"),
                "status": "pending", "next_attempt_at": now + (hold or timedelta(0)),
                "broadcast_id": broadcast_id, "created_at": now}
                for (_, subscriber, _, part), message_id in zip(parts, message_ids,
                                                                strict=True)])
        for (index, _, _, part), outbox_id in zip(parts, outbox_ids, strict=True):
            queued[index].append((outbox_id, part))
        return queued


async def _insert_returning_ids(session: AsyncSession, model: Any,
                                rows: list[dict[str, Any]]) -> list[int]:
    """Insert many rows; their new ids in the order of ``rows``.

    SQLAlchemy keeps that order on SQLite only by inserting row by row (a trip to the
    database each). One multi-row INSERT gives SQLite's rows increasing ids in order, and
    our transactions hold the write lock (BEGIN IMMEDIATE), so the sorted ids are in
    order too. PostgreSQL batches the ordered form itself."""
    if session.bind.dialect.name == "sqlite":
        ids = (await session.scalars(insert(model).returning(model.id), rows)).all()
        return sorted(ids)
    return list((await session.scalars(
        insert(model).returning(model.id, sort_by_parameter_order=True), rows)).all())

"""The database schema (SQLAlchemy 2 declarative). Migrations in ``alembic/`` mirror it.

Times are stored as naive UTC (``UtcDateTime`` converts at the boundary) so SQLite and
PostgreSQL behave alike.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy import text as sql_text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from bot_platform.statuses import (
    BroadcastStatus,
    ConversationStatus,
    JobStatus,
    OutboxStatus,
    PositionStatus,
    RecipientStatus,
    SubscriberStatus,
)

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# BIGINT ids on PostgreSQL, INTEGER (the rowid alias) on SQLite.
Id = BigInteger().with_variant(Integer(), "sqlite")


class UtcDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in Python, naive UTC in the database."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UtcDateTime, dict[str, Any]: JSON, list[Any]: JSON}


class Contact(Base):
    """A person; one contact may be reachable on several channels (subscribers)."""

    __tablename__ = "contacts"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    phone: Mapped[str | None] = mapped_column(String(32), index=True)
    email: Mapped[str | None] = mapped_column(String(255), index=True)
    created_at: Mapped[datetime]


class Subscriber(Base):
    """One channel identity of a contact: (channel, bot, messenger user id)."""

    __tablename__ = "subscribers"
    __table_args__ = (UniqueConstraint("channel", "bot_id", "user_id"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    contact_id: Mapped[int] = mapped_column(ForeignKey("contacts.id"), index=True)
    channel: Mapped[str] = mapped_column(String(32))
    bot_id: Mapped[str] = mapped_column(String(64))
    user_id: Mapped[str] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16), default=SubscriberStatus.SUBSCRIBED)
    locale: Mapped[str | None] = mapped_column(String(16))
    first_name: Mapped[str | None] = mapped_column(String(255))
    last_name: Mapped[str | None] = mapped_column(String(255))
    username: Mapped[str | None] = mapped_column(String(255))
    source_ref: Mapped[str | None] = mapped_column(String(255))
    attributes: Mapped[dict[str, Any]] = mapped_column(default=dict)
    last_inbound_at: Mapped[datetime | None]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class SubscriberTag(Base):
    """A tag on a subscriber; a table (not a JSON list) so segments can query it portably."""

    __tablename__ = "subscriber_tags"

    subscriber_id: Mapped[int] = mapped_column(
        ForeignKey("subscribers.id", ondelete="CASCADE"), primary_key=True
    )
    tag: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)


class FlowState(Base):
    """Where one subscriber stands in one flow. ``version`` grows on every state entry so
    timers scheduled in an older state instance know they are stale."""

    __tablename__ = "flow_states"
    __table_args__ = (UniqueConstraint("subscriber_id", "flow"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    subscriber_id: Mapped[int] = mapped_column(ForeignKey("subscribers.id", ondelete="CASCADE"))
    flow: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer, default=1)
    status: Mapped[str] = mapped_column(String(16), default=PositionStatus.ACTIVE)
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class Message(Base):
    """Every message in and out, with its delivery status."""

    __tablename__ = "messages"
    __table_args__ = (Index("ix_messages_channel_message", "channel", "channel_message_id"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    subscriber_id: Mapped[int] = mapped_column(
        ForeignKey("subscribers.id", ondelete="CASCADE"), index=True
    )
    channel: Mapped[str] = mapped_column(String(32))
    direction: Mapped[str] = mapped_column(String(3))  # in | out
    kind: Mapped[str] = mapped_column(String(16))
    text: Mapped[str | None] = mapped_column(Text)
    payload: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    channel_message_id: Mapped[str | None] = mapped_column(String(255))
    # out: queued | sent | delivered | read | failed | skipped; in: received
    status: Mapped[str] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text)
    flow: Mapped[str | None] = mapped_column(String(64))
    broadcast_id: Mapped[int | None] = mapped_column(Id, index=True)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class ProcessedEvent(Base):
    """Inbound events already handled; the primary key makes re-deliveries no-ops."""

    __tablename__ = "processed_events"

    channel: Mapped[str] = mapped_column(String(32), primary_key=True)
    bot_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    event_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    processed_at: Mapped[datetime] = mapped_column(index=True)


class Job(Base):
    """A durable timer or background task, claimed by workers with a lease."""

    __tablename__ = "jobs"
    __table_args__ = (
        # id last: a claim takes jobs in (due_at, id) order straight off the index, also
        # when many are due at the same instant (0007_jobs_due_order).
        Index("ix_jobs_due", "status", "due_at", "id"),
        Index("ix_jobs_subscriber", "subscriber_id", "status"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    subscriber_id: Mapped[int | None] = mapped_column(
        ForeignKey("subscribers.id", ondelete="CASCADE")
    )
    flow: Mapped[str | None] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    due_at: Mapped[datetime]
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    locked_by: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    result: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]


_BULK_UNSENT = "broadcast_id IS NOT NULL AND status IN ('pending', 'sending')"


class Outbox(Base):
    """A message waiting to be sent: written in the same transaction as the state change
    that produced it, sent by the delivery worker (transactional outbox)."""

    __tablename__ = "outbox"
    __table_args__ = (
        Index("ix_outbox_due", "status", "next_attempt_at"),
        Index("ix_outbox_subscriber", "subscriber_id", "status"),
        # Interactive rows (not a broadcast's) waiting or in hand, in due order: the
        # delivery claims these first, and finds them without reading a running
        # broadcast's rows nor every waiting timer's.
        Index("ix_outbox_interactive_due", "status", "next_attempt_at", "id",
              postgresql_where=sql_text("broadcast_id IS NULL"),
              sqlite_where=sql_text("broadcast_id IS NULL")),
        # Broadcasts' rows, in due order: the bulk claim reads these without reading
        # every waiting interactive row (a wave of timers).
        Index("ix_outbox_bulk_due", "status", "next_attempt_at", "id",
              postgresql_where=sql_text("broadcast_id IS NOT NULL"),
              sqlite_where=sql_text("broadcast_id IS NOT NULL")),
        # Broadcasts' rows still to send, in id order: PostgreSQL's bulk claim walks
        # these and stops after the rows it takes, never past the rows already sent.
        Index("ix_outbox_bulk_unsent", "id",
              postgresql_where=sql_text(_BULK_UNSENT), sqlite_where=sql_text(_BULK_UNSENT)),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    subscriber_id: Mapped[int] = mapped_column(ForeignKey("subscribers.id", ondelete="CASCADE"))
    message_id: Mapped[int] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"))
    channel: Mapped[str] = mapped_column(String(32))
    bot_id: Mapped[str] = mapped_column(String(64))
    recipient: Mapped[str] = mapped_column(String(128))
    payload: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(String(16), default=OutboxStatus.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime]
    locked_by: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    broadcast_id: Mapped[int | None] = mapped_column(Id)
    created_at: Mapped[datetime]
    sent_at: Mapped[datetime | None]


class KeyValue(Base):
    """Small durable adapter state (polling offsets, long callback payloads)."""

    __tablename__ = "kv"

    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[datetime]


class Conversation(Base):
    """A chat escalated to humans. While one is open (waiting or assigned) the subscriber's
    messages go to it instead of the flows, and timers/broadcasts are suppressed."""

    __tablename__ = "conversations"
    __table_args__ = (Index("ix_conversations_open", "status", "created_at"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    subscriber_id: Mapped[int] = mapped_column(
        ForeignKey("subscribers.id", ondelete="CASCADE"), index=True)
    status: Mapped[str] = mapped_column(String(16), default=ConversationStatus.WAITING)
    reason: Mapped[str] = mapped_column(String(64))
    summary: Mapped[str | None] = mapped_column(Text)
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)  # answers that led here
    agent_id: Mapped[str | None] = mapped_column(String(64))  # the agent's API key id
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    assigned_at: Mapped[datetime | None]
    first_reply_at: Mapped[datetime | None]
    resolved_at: Mapped[datetime | None]


class ConversationNote(Base):
    """An agents-only note on a conversation (never sent to the customer)."""

    __tablename__ = "conversation_notes"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    conversation_id: Mapped[int] = mapped_column(
        ForeignKey("conversations.id", ondelete="CASCADE"), index=True)
    author: Mapped[str] = mapped_column(String(64))
    text: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime]


class CustomerEvent(Base):
    """What the shop tells us a customer did (cart_updated, order_placed, birthday ...).
    ``external_id`` makes ingestion idempotent: the same event posted twice counts once."""

    __tablename__ = "events"
    __table_args__ = (
        Index("ix_events_subscriber", "subscriber_id", "name", "occurred_at"),
        Index("ix_events_contact", "contact_id", "name", "occurred_at"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    external_id: Mapped[str | None] = mapped_column(String(255), unique=True)
    name: Mapped[str] = mapped_column(String(64))
    contact_id: Mapped[int | None] = mapped_column(
        ForeignKey("contacts.id", ondelete="SET NULL"))
    subscriber_id: Mapped[int | None] = mapped_column(
        ForeignKey("subscribers.id", ondelete="SET NULL"))
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)
    occurred_at: Mapped[datetime]
    created_at: Mapped[datetime]


class PromoCode(Base):
    """A unique code in a pool; handed out at most once (``issued_at`` set atomically)."""

    __tablename__ = "promo_codes"
    __table_args__ = (
        UniqueConstraint("pool", "code"),
        Index("ix_promo_codes_free", "pool", "issued_at"),
        Index("ix_promo_codes_contact", "contact_id", "pool"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    pool: Mapped[str] = mapped_column(String(64))
    code: Mapped[str] = mapped_column(String(64))
    contact_id: Mapped[int | None] = mapped_column(
        ForeignKey("contacts.id", ondelete="SET NULL"))
    subscriber_id: Mapped[int | None] = mapped_column(
        ForeignKey("subscribers.id", ondelete="SET NULL"))
    issued_at: Mapped[datetime | None]
    created_at: Mapped[datetime]


class Product(Base):
    """A catalog item that flows can recommend."""

    __tablename__ = "products"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    sku: Mapped[str] = mapped_column(String(64), unique=True)
    title: Mapped[str] = mapped_column(String(255))
    url: Mapped[str] = mapped_column(String(1024))
    image_url: Mapped[str | None] = mapped_column(String(1024))
    price: Mapped[float | None]
    currency: Mapped[str | None] = mapped_column(String(8))
    category: Mapped[str | None] = mapped_column(String(64), index=True)
    tags: Mapped[list[Any]] = mapped_column(default=list)
    attributes: Mapped[dict[str, Any]] = mapped_column(default=dict)
    in_stock: Mapped[bool] = mapped_column(default=True)
    updated_at: Mapped[datetime]


class TrackedLink(Base):
    """A link sent to a subscriber; ``/r/<token>`` counts the click and redirects."""

    __tablename__ = "tracked_links"

    token: Mapped[str] = mapped_column(String(32), primary_key=True)
    subscriber_id: Mapped[int | None] = mapped_column(
        ForeignKey("subscribers.id", ondelete="SET NULL"), index=True)
    url: Mapped[str] = mapped_column(String(2048))
    flow: Mapped[str | None] = mapped_column(String(64))
    sku: Mapped[str | None] = mapped_column(String(64))
    broadcast_id: Mapped[int | None] = mapped_column(Id)
    clicks: Mapped[int] = mapped_column(Integer, default=0)
    first_clicked_at: Mapped[datetime | None]
    created_at: Mapped[datetime]


class Answer(Base):
    """One answer to a flow question (quiz, NPS ...), kept for analytics."""

    __tablename__ = "answers"
    __table_args__ = (Index("ix_answers_question", "flow", "question"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    subscriber_id: Mapped[int] = mapped_column(
        ForeignKey("subscribers.id", ondelete="CASCADE"), index=True)
    flow: Mapped[str] = mapped_column(String(64))
    question: Mapped[str] = mapped_column(String(64))
    value: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime]


class GameSpin(Base):
    """How many times a contact has played a game (a prize wheel)."""

    __tablename__ = "game_spins"

    contact_id: Mapped[int] = mapped_column(
        ForeignKey("contacts.id", ondelete="CASCADE"), primary_key=True)
    game: Mapped[str] = mapped_column(String(64), primary_key=True)
    spins: Mapped[int] = mapped_column(Integer, default=0)
    # Prizes won (blanks excluded): the spin's compare-and-set also checks it, so a
    # contact wins at most ``max_wins`` prizes whatever the interleaving.
    wins: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class GameWin(Base):
    """A spin's outcome, for stock limits and analytics; ``code`` is the promo code
    reserved for it in the same transaction (drawn before the win is announced)."""

    __tablename__ = "game_wins"
    __table_args__ = (Index("ix_game_wins_prize", "game", "prize"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    contact_id: Mapped[int] = mapped_column(ForeignKey("contacts.id", ondelete="CASCADE"))
    game: Mapped[str] = mapped_column(String(64))
    prize: Mapped[str] = mapped_column(String(64))
    code: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime]


class Referral(Base):
    """A new subscriber who came through another contact's referral link (``rf-<id>``)."""

    __tablename__ = "referrals"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    referrer_contact_id: Mapped[int] = mapped_column(
        ForeignKey("contacts.id", ondelete="CASCADE"), index=True)
    referred_subscriber_id: Mapped[int] = mapped_column(
        ForeignKey("subscribers.id", ondelete="CASCADE"), unique=True)
    created_at: Mapped[datetime]


class ApiKey(Base):
    """An admin API key. Only a hash is stored; the key is shown once, at creation."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))  # admin | marketer | agent
    prefix: Mapped[str] = mapped_column(String(16), unique=True)  # identifies, not secret
    key_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime]
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


class Broadcast(Base):
    """A message (or a flow) sent to a segment, optionally in A/B variants."""

    __tablename__ = "broadcasts"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    # draft | scheduled | running | paused | completed | cancelled
    status: Mapped[str] = mapped_column(String(16), default=BroadcastStatus.DRAFT)
    segment: Mapped[dict[str, Any]]  # the filter (bot_platform.segments)
    variants: Mapped[list[Any]]  # [{name, percent, content: {locale: message} | flow}]
    tag: Mapped[str | None] = mapped_column(String(64))  # Facebook message tag
    scheduled_at: Mapped[datetime | None]
    local_time: Mapped[str | None] = mapped_column(String(5))  # "10:00" in each one's zone
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    created_at: Mapped[datetime]


class BroadcastRecipient(Base):
    """A recipient snapshotted at start: queued exactly once, even across crashes."""

    __tablename__ = "broadcast_recipients"
    __table_args__ = (UniqueConstraint("broadcast_id", "subscriber_id"),
                      # id last: a send job's batch is a walk in id order (0009).
                      Index("ix_broadcast_recipients_todo", "broadcast_id", "status", "id"))

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    broadcast_id: Mapped[int] = mapped_column(ForeignKey("broadcasts.id", ondelete="CASCADE"))
    subscriber_id: Mapped[int] = mapped_column(
        ForeignKey("subscribers.id", ondelete="CASCADE"))
    variant: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), default=RecipientStatus.PENDING)
    reason: Mapped[str | None] = mapped_column(String(64))
    due_at: Mapped[datetime | None]  # with local_time: when it is that time for them


class BotRecord(Base):
    """A bot registered through the admin API (bots may also come from settings).

    Tokens must be usable to call the messenger, so they cannot be hashed; they are never
    returned by the API nor logged."""

    __tablename__ = "bots"
    __table_args__ = (UniqueConstraint("channel", "bot_id"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    channel: Mapped[str] = mapped_column(String(32))
    bot_id: Mapped[str] = mapped_column(String(64))
    token: Mapped[str | None] = mapped_column(Text)
    secret: Mapped[str | None] = mapped_column(Text)
    verify_token: Mapped[str | None] = mapped_column(Text)
    api_base: Mapped[str | None] = mapped_column(String(512))
    messages_per_second: Mapped[float | None]
    per_chat_per_second: Mapped[float | None]
    options: Mapped[dict[str, Any]] = mapped_column(default=dict)
    enabled: Mapped[bool] = mapped_column(default=True)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class FlowVersion(Base):
    """A flow uploaded through the admin API. Activation is explicit; the active version
    replaces the file of the same flow name."""

    __tablename__ = "flow_versions"
    __table_args__ = (UniqueConstraint("flow", "version"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    flow: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    # Catalog entries uploaded with the version: locale -> Fluent text. In use (over the
    # files' keys of the same name) while the version is active.
    texts: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    active: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime]
    activated_at: Mapped[datetime | None]


class AiBudget(Base):
    """AI tokens per bot and month: ``spent`` as billed, ``reserved`` by calls in flight.
    A call reserves its maximum with a compare-and-set (``spent + reserved + n <= limit``)
    and settles with its real usage, so concurrent calls never overspend together."""

    __tablename__ = "ai_budget"

    bot_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    month: Mapped[str] = mapped_column(String(7), primary_key=True)  # YYYY-MM
    spent: Mapped[int] = mapped_column(BigInteger, default=0)
    reserved: Mapped[int] = mapped_column(BigInteger, default=0)

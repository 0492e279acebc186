"""Every status a row can be in, in one place.

``StrEnum`` members are the very strings stored in the database (no migration): a member
compares equal to its string, and a status read back as a plain ``str`` still matches.
"""

from __future__ import annotations

from enum import StrEnum


class OutboxStatus(StrEnum):
    """An outbox row: waiting, in a worker's hand, held back, or done."""

    PENDING = "pending"  # waiting for ``next_attempt_at``
    SENDING = "sending"  # claimed with a lease by a worker
    HELD = "held"  # its broadcast is paused
    SENT = "sent"
    FAILED = "failed"
    SKIPPED = "skipped"  # never sent: unsubscribed, cancelled, outside the window

    @classmethod
    def waiting(cls) -> tuple[OutboxStatus, ...]:
        """Not sent and not in anybody's hand: what a pause, cancel or forget may move."""
        return cls.PENDING, cls.HELD

    @classmethod
    def unsent(cls) -> tuple[OutboxStatus, ...]:
        """Still to go out, in order: later rows of the subscriber wait for these."""
        return cls.PENDING, cls.SENDING


class MessageStatus(StrEnum):
    """A ``messages`` row (in or out): how far it got."""

    QUEUED = "queued"
    SENT = "sent"
    DELIVERED = "delivered"
    READ = "read"
    FAILED = "failed"
    SKIPPED = "skipped"


class JobStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"  # claimed with a lease by a worker
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"  # a flow timer whose state was left before it was due


class SubscriberStatus(StrEnum):
    SUBSCRIBED = "subscribed"
    UNSUBSCRIBED = "unsubscribed"


class PositionStatus(StrEnum):
    """A subscriber's position in a flow."""

    ACTIVE = "active"
    FINISHED = "finished"


class ConversationStatus(StrEnum):
    """A hand-off to a human: waiting for an agent, taken by one, or over."""

    WAITING = "waiting"
    ASSIGNED = "assigned"
    RESOLVED = "resolved"

    @classmethod
    def open(cls) -> tuple[ConversationStatus, ...]:
        """Not resolved yet: the bot keeps quiet."""
        return cls.WAITING, cls.ASSIGNED


class BroadcastStatus(StrEnum):
    DRAFT = "draft"
    SCHEDULED = "scheduled"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    CANCELLED = "cancelled"

    @classmethod
    def stoppable(cls) -> tuple[BroadcastStatus, ...]:
        """What a cancel may stop (a completed one too, while some of its rows wait)."""
        return cls.DRAFT, cls.SCHEDULED, cls.RUNNING, cls.PAUSED


class RecipientStatus(StrEnum):
    """A broadcast's recipient: turned into outbox rows exactly once, or skipped."""

    PENDING = "pending"
    QUEUED = "queued"
    SKIPPED = "skipped"

"""Who may read a chat handed to humans, and the conversation's status changes.

The visibility rule, used everywhere chat text is returned (the handoff API, its live
stream, a subscriber's profile):

- an admin reads every chat;
- an agent reads a chat that is waiting (so they can pick it) and chats assigned to them,
  open or resolved; a chat assigned to another agent, open or resolved, stays closed to
  them (a transfer hands it over, and with it the right to read it);
- a marketer reads no chat text.

Status changes are compare-and-set (``UPDATE ... WHERE status = expected``): two agents
claiming at once -> one wins; a transfer or resolve racing a resolve -> one wins and the
other learns it (409), so a resolved chat is never silently reopened and ``resolved_at``
is written once. A turn opens a conversation (``HandoffRules.escalate``: the customer asked
for a human, or a flow or the assistant escalated); every later move goes through this
module too. While one is open, flows, timers and shop events leave the chat alone
(``open_conversation``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import ColumnElement, exists, false, func, literal, select, true, update
from sqlalchemy.ext.asyncio import AsyncSession

from bot_platform.apikeys import Principal
from bot_platform.i18n import Catalogs
from bot_platform.models import Conversation, Subscriber
from bot_platform.statuses import ConversationStatus
from bot_platform.types import Outgoing

if TYPE_CHECKING:
    from bot_platform.flows.turn import Turn

OPEN = ConversationStatus.open()
DEFAULT_HANDOFF_KEYWORDS = {
    "en": ["operator", "human", "agent", "talk to a human", "talk to a person"],
    "uk": ["оператор", "людина", "менеджер"],
    "pl": ["konsultant", "człowiek", "operator"],
    "ar": ["موظف", "إنسان", "خدمة العملاء"],
}


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


@dataclass
class HandoffRules:
    """How a chat reaches a human: the typed words that ask for one (per locale, "*" for
    all) and when agents answer (None: always)."""

    keywords: dict[str, list[str]] = field(
        default_factory=lambda: dict(DEFAULT_HANDOFF_KEYWORDS))
    support_hours: SupportHours | None = None

    def words(self, locale: str) -> list[str]:
        """The words that reach a person in ``locale`` (the first one is suggested)."""
        return self.keywords.get(locale) or self.keywords.get("*") or []

    def asks_for_human(self, locale: str, text: str) -> bool:
        words = self.keywords.get(locale, []) + self.keywords.get("*", [])
        wanted = text.strip().casefold().rstrip("!?.")
        return bool(wanted) and wanted in {w.casefold() for w in words}

    async def escalate(self, session: AsyncSession, subscriber: Subscriber, turn: Turn,
                       catalogs: Catalogs) -> list[tuple[str | None, Outgoing]]:
        """Open a conversation waiting for an agent (once) and tell the customer."""
        escalation = turn.escalation
        assert escalation is not None
        if await open_conversation(session, subscriber.id) is not None:
            return []
        now = turn.now
        session.add(Conversation(
            subscriber_id=subscriber.id, status=ConversationStatus.WAITING,
            reason=escalation.reason,
            summary=escalation.summary, data=escalation.data, created_at=now,
            updated_at=now))
        key, variables = "handoff-waiting", turn.variables(catalogs)
        hours = self.support_hours
        if hours is not None and not hours.open_at(now):
            key = "handoff-waiting-closed"
            variables = {**variables, "opens": hours.next_opening(now)}
        if not catalogs.has(catalogs.default_locale, key):
            return []
        return [(None, Outgoing(text=catalogs.format(turn.locale, key, variables)))]


async def open_conversation(session: AsyncSession, subscriber_id: int) -> Conversation | None:
    """The subscriber's chat that humans own now (waiting or assigned), if any."""
    return await session.scalar(select(Conversation).where(
        Conversation.subscriber_id == subscriber_id,
        Conversation.status.in_(OPEN)).limit(1))


def readable(principal: Principal) -> ColumnElement[bool]:
    """The visibility rule as a condition on ``Conversation`` rows."""
    if principal.role == "admin":
        return true()
    if principal.role != "agent":
        return false()
    return ((Conversation.status == ConversationStatus.WAITING)
            | (Conversation.agent_id == str(principal.key_id)))


def may_read(principal: Principal, conversation: Conversation) -> bool:
    """The visibility rule for one loaded conversation (same as ``readable``)."""
    if principal.role == "admin":
        return True
    return principal.role == "agent" and (conversation.status == ConversationStatus.WAITING
                                          or conversation.agent_id == str(principal.key_id))


def may_act(principal: Principal, conversation: Conversation) -> bool:
    """Replying, transferring and resolving: the assigned agent, or an admin."""
    return principal.role == "admin" or conversation.agent_id == str(principal.key_id)


async def may_read_subscriber(session: AsyncSession, principal: Principal,
                              subscriber_id: int) -> bool:
    """Whether ``principal`` may read a subscriber's messages: they may read one of the
    subscriber's chats (a chat's history is the subscriber's messages)."""
    if principal.role == "admin":
        return True
    if principal.role != "agent":
        return False
    return bool(await session.scalar(select(exists().where(
        Conversation.subscriber_id == subscriber_id, readable(principal)))))


async def claim(session: AsyncSession, conversation_id: int, *, agent_id: str,
                now: datetime) -> bool:
    """waiting -> assigned to ``agent_id``; False when it was not waiting."""
    won = await session.execute(update(Conversation).where(
        Conversation.id == conversation_id,
        Conversation.status == ConversationStatus.WAITING).values(
        status=ConversationStatus.ASSIGNED, agent_id=agent_id, assigned_at=now, updated_at=now))
    return won.rowcount == 1


def _as_loaded(conversation: Conversation) -> list[ColumnElement[bool]]:
    """Conditions that hold while the row is still as ``conversation`` was loaded."""
    same_agent = (Conversation.agent_id.is_(None) if conversation.agent_id is None
                  else Conversation.agent_id == conversation.agent_id)
    return [Conversation.id == conversation.id, Conversation.status == conversation.status,
            same_agent]


async def transfer(session: AsyncSession, conversation: Conversation, *, to_agent: str,
                   now: datetime) -> bool:
    """An open chat, as loaded, -> assigned to ``to_agent``; False when it was resolved or
    changed hands in between (a resolved chat is not reopened)."""
    if conversation.status not in OPEN:
        return False
    moved = await session.execute(update(Conversation).where(*_as_loaded(conversation)).values(
        status=ConversationStatus.ASSIGNED, agent_id=to_agent,
        assigned_at=conversation.assigned_at or now, updated_at=now))
    return moved.rowcount == 1


async def resolve(session: AsyncSession, conversation: Conversation, *,
                  now: datetime) -> bool:
    """An open chat, as loaded, -> resolved; False when it was already resolved or
    changed hands in between (``resolved_at`` is written once)."""
    if conversation.status not in OPEN:
        return False
    done = await session.execute(update(Conversation).where(*_as_loaded(conversation)).values(
        status=ConversationStatus.RESOLVED, resolved_at=now, updated_at=now))
    return done.rowcount == 1


async def record_reply(session: AsyncSession, conversation: Conversation, *,
                       now: datetime) -> bool:
    """Note an agent's reply (first reply time); False when the chat is no longer assigned
    to the agent it was loaded with (resolved or transferred in between)."""
    if conversation.status != ConversationStatus.ASSIGNED:
        return False
    noted = await session.execute(update(Conversation).where(*_as_loaded(conversation)).values(
        first_reply_at=func.coalesce(Conversation.first_reply_at,
                                     literal(now, Conversation.first_reply_at.type)),
        updated_at=now))
    return noted.rowcount == 1


async def close_for_subscribers(session: AsyncSession, subscriber_ids: Sequence[int], *,
                                now: datetime) -> None:
    """Resolve the open chats of forgotten subscribers (nobody is left to answer)."""
    if subscriber_ids:
        await session.execute(update(Conversation).where(
            Conversation.subscriber_id.in_(subscriber_ids),
            Conversation.status.in_(OPEN)).values(
            status=ConversationStatus.RESOLVED, resolved_at=now, updated_at=now))

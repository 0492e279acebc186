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
is written once. Conversations are opened by the engine (``Engine.escalate``); every later
move goes through this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import ColumnElement, exists, false, func, literal, select, true, update
from sqlalchemy.ext.asyncio import AsyncSession

from bot_platform.apikeys import Principal
from bot_platform.models import Conversation

OPEN = ("waiting", "assigned")


def readable(principal: Principal) -> ColumnElement[bool]:
    """The visibility rule as a condition on ``Conversation`` rows."""
    if principal.role == "admin":
        return true()
    if principal.role != "agent":
        return false()
    return (Conversation.status == "waiting") | (Conversation.agent_id == str(principal.key_id))


def may_read(principal: Principal, conversation: Conversation) -> bool:
    """The visibility rule for one loaded conversation (same as ``readable``)."""
    if principal.role == "admin":
        return True
    return principal.role == "agent" and (conversation.status == "waiting"
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
        Conversation.id == conversation_id, Conversation.status == "waiting").values(
        status="assigned", agent_id=agent_id, assigned_at=now, updated_at=now))
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
        status="assigned", agent_id=to_agent,
        assigned_at=conversation.assigned_at or now, updated_at=now))
    return moved.rowcount == 1


async def resolve(session: AsyncSession, conversation: Conversation, *,
                  now: datetime) -> bool:
    """An open chat, as loaded, -> resolved; False when it was already resolved or
    changed hands in between (``resolved_at`` is written once)."""
    if conversation.status not in OPEN:
        return False
    done = await session.execute(update(Conversation).where(*_as_loaded(conversation)).values(
        status="resolved", resolved_at=now, updated_at=now))
    return done.rowcount == 1


async def record_reply(session: AsyncSession, conversation: Conversation, *,
                       now: datetime) -> bool:
    """Note an agent's reply (first reply time); False when the chat is no longer assigned
    to the agent it was loaded with (resolved or transferred in between)."""
    if conversation.status != "assigned":
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
            status="resolved", resolved_at=now, updated_at=now))

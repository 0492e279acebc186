"""One event's working set (``Turn``), the effects it records, and the services actions
may use. The engine loads a turn, lets the flows change it, and persists the new
positions and the effects in the same transaction."""

from __future__ import annotations

import logging
import random
import re
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote, urlsplit

from sqlalchemy.ext.asyncio import AsyncSession

from bot_platform.errors import FlowError
from bot_platform.i18n import Catalogs
from bot_platform.statuses import PositionStatus
from bot_platform.types import Outgoing

if TYPE_CHECKING:
    from bot_platform.flows.machine import FlowSet

log = logging.getLogger(__name__)


@dataclass
class Position:
    """Where a subscriber stands in one flow (mirrors a ``flow_states`` row)."""

    flow: str
    state: str
    version: int = 0
    status: str = PositionStatus.ACTIVE
    data: dict[str, Any] = field(default_factory=dict)
    updated_at: datetime | None = None
    changed: bool = False


@dataclass(frozen=True, slots=True)
class SendEffect:
    flow: str | None
    message: Outgoing
    # (delay, preferred channel): resend through another channel if still unread then
    fallback: tuple[timedelta, str | None] | None = None


@dataclass(frozen=True, slots=True)
class TimerEffect:
    flow: str
    state: str
    version: int
    due_at: datetime


@dataclass(frozen=True, slots=True)
class JobEffect:
    """Background work to schedule for this subscriber (an AI answer, for example)."""

    kind: str
    payload: dict[str, Any]
    due_at: datetime


@dataclass(frozen=True, slots=True)
class Escalation:
    """A request to hand the chat to humans, raised by a flow (or the AI fallback)."""

    reason: str
    summary: str | None
    data: dict[str, Any]


class TurnServices(Protocol):
    """What actions may use of the platform (the engine provides it)."""

    @property
    def catalogs(self) -> Catalogs: ...

    @property
    def flows(self) -> FlowSet: ...

    @property
    def public_url(self) -> str | None: ...  # where tracked links redirect through /r/

    @property
    def random(self) -> random.Random: ...  # games draw from this (tests may seed it)


@dataclass
class Turn:
    """One event's working set: the subscriber's data as the flows change it, plus the
    effects to persist. Built and persisted by the engine."""

    subscriber_id: int
    contact_id: int
    channel: str
    locale: str
    now: datetime
    attributes: dict[str, Any]
    tags: set[str]
    profile: dict[str, Any]
    positions: dict[str, Position]
    original_tags: set[str] = field(default_factory=set)
    effects: list[SendEffect | TimerEffect | JobEffect] = field(default_factory=list)
    pending_starts: deque[str] = field(default_factory=deque)
    attributes_changed: bool = False
    escalation: Escalation | None = None
    answers: list[tuple[str, str, str]] = field(default_factory=list)  # flow, question, value
    session: AsyncSession | None = None  # the event's session, for actions that need the db
    services: TurnServices | None = None  # for actions that need platform services

    def lookup(self, name: str) -> Any:
        if name in ("locale", "channel"):
            return getattr(self, name)
        return self.attributes.get(name, self.profile.get(name))

    def variables(self, catalogs: Catalogs) -> dict[str, Any]:
        values: dict[str, Any] = {k: v for k, v in self.profile.items() if v is not None}
        values.update({k: v for k, v in self.attributes.items()
                       if isinstance(v, str | int | float)})
        if not values.get("first_name"):
            values["first_name"] = catalogs.format(self.locale, "default-name")
        values["referral_ref"] = f"rf-{self.contact_id}"  # a deep-link ref crediting them
        return values

    def platform(self) -> tuple[AsyncSession, TurnServices]:
        """The session and services, for actions that need them (the engine always sets
        both; a turn built without them cannot run such an action)."""
        if self.session is None or self.services is None:
            raise FlowError("this action needs the database and the platform's services")
        return self.session, self.services


# ---- placeholders ----------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def _placeholder_value(turn: Turn, name: str) -> str:
    """An attribute as placeholder text; a missing one is empty (0 stays "0")."""
    value = turn.lookup(name)
    return "" if value is None else str(value)


def has_placeholders(value: str) -> bool:
    """Whether filling ``value`` for a turn can change it."""
    return _PLACEHOLDER.search(value) is not None


def interpolate(value: Any, turn: Turn) -> Any:
    """A string with its ``{attribute}`` placeholders filled (other values unchanged)."""
    if not isinstance(value, str):
        return value
    return _PLACEHOLDER.sub(lambda m: _placeholder_value(turn, m.group(1)), value)


def fill_url(url: str, turn: Turn) -> str | None:
    """A button URL with its ``{attribute}`` placeholders filled like texts fill them
    (a missing attribute is empty), each value percent-encoded as one URL component, so
    an order id like ``A&B 1/2`` cannot add query parameters or path segments. A URL
    that starts with a placeholder takes the value as the URL's start, unencoded (a link
    the shop sent, e.g. ``{cart_updated_url}``). None when the result is not an http(s)
    URL: the button is left out rather than the message refused by the messenger."""
    def component(match: re.Match[str]) -> str:
        text = _placeholder_value(turn, match.group(1))
        return text if match.start() == 0 else quote(text, safe="")

    filled = _PLACEHOLDER.sub(component, url)
    if urlsplit(filled).scheme.lower() not in ("http", "https") or any(
            c.isspace() or ord(c) < 32 for c in filled):
        log.warning("button URL %r is %r after filling placeholders; button left out",
                    url, filled)
        return None
    return filled

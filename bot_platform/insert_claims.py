"""A turn's reply claimed by the statement that inserts it (PostgreSQL, ``botp web``'s own
replies, ``own_replies``): one round trip less per event.

Why: the web claimed a turn's rows with an ``UPDATE`` of its own (``claim_queued``), the
turn's last statement before the commit; it could not ride in the insert's trip (a
statement's parts share one snapshot, and an ``UPDATE`` in it does not see the rows a
sibling clause inserts).

How: the outbox row is inserted already ``sending``, locked by this process with the
lease of a claim, when its subscriber has no row unsent in the statement's snapshot but
those this process sends for them right now (``ahead``); else ``pending``, as before
(the workers are woken for it). The snapshot rules are a claim's: the statement sees
every row committed before it began, under the subscriber's advisory lock, and none of
its own (every row it could see has a smaller id). The rows stay in the event's
SAVEPOINT: its rollback undoes the claim with the insert. ``take`` then builds the rows
it holds from what the turn knows (the subscriber's status and last inbound time as the
turn leaves them), with no statement.

Only one row with no hold (a reply; Viber's held replies are not claimed), only on
PostgreSQL through the driver; anything else (SQLite, several rows) is inserted pending
and claimed by ``claim_queued`` as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam as bind
from sqlalchemy import case, exists, insert, null, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from bot_platform.direct import direct
from bot_platform.models import Outbox
from bot_platform.statement_forms import Columns, in_ids, parent_insert
from bot_platform.statuses import OutboxStatus

_EARLIER = aliased(Outbox, name="earlier")


@dataclass(slots=True)
class InsertClaim:
    """What a claiming insert needs (``OwnReplies.offer``, before the turn runs) and what
    it did: the rows it inserted (``decided``), those of them it claimed (``claimed``:
    the values of a ``ClaimedRow`` but the subscriber's)."""

    worker: str
    ahead: list[int]  # rows of the subscriber this process holds (its line), sent first
    seen: int  # ``OwnReplies``' failures so far: a later one may void what this counted on
    started: float  # the lease's start (``Leases.starting``)
    until: datetime  # the lease stamped
    subscriber: Any = None
    decided: set[int] = field(default_factory=set)
    claimed: list[tuple[Any, ...]] = field(default_factory=list)

    def rows(self) -> list[Any]:
        """The rows claimed at insert, with their subscriber as the turn left it."""
        from bot_platform.outbox_results import ClaimedRow  # it imports the outbox

        subscriber = self.subscriber
        return [ClaimedRow(row_id, message_id, subscriber_id, channel, bot_id, recipient,
                           payload, 0, subscriber.status, subscriber.last_inbound_at, None,
                           True)
                for row_id, message_id, subscriber_id, channel, bot_id, recipient, payload
                in sorted(self.claimed)]


_PAIRS: dict[tuple[Any, ...], Any] = {}


def claiming_pair(parent: Any, parent_keys: tuple[str, ...], child: Any,
                  child_keys: tuple[str, ...], link: str) -> Any:
    """``statement_forms.linked_pair`` for an outbox row, claimed if nothing is ahead of
    it (the module's docstring); returns the row's id, its message's and its status.
    Every value a parameter (no quotes): the deferred writes before it still ride in it
    (``pg_driver.merge_writes``)."""
    key = (parent, parent_keys, child, child_keys, link)
    statement = _PAIRS.get(key)
    if statement is None:
        inserted = parent_insert(parent, parent_keys)
        earlier = _EARLIER
        free = select((~exists().where(
            earlier.subscriber_id == bind("b_sid", type_=child.c.subscriber_id.type),
            earlier.status.in_([bind("b_pending", type_=child.c.status.type),
                                bind("b_busy", type_=child.c.status.type)]),
            ~in_ids(earlier.id, "b_ahead"))).label("ok")).cte("free")
        ok = select(free.c.ok).scalar_subquery()
        statement = insert(child).values({
            **{name: bind(f"c_{name}") for name in child_keys
               if name not in (link, "status")},
            link: select(inserted.c.id).scalar_subquery(),
            "status": case((ok, bind("b_sending", type_=child.c.status.type)),
                           else_=bind("c_status", type_=child.c.status.type)),
            "locked_by": case((ok, bind("b_worker", type_=child.c.locked_by.type)),
                              else_=null()),
            "lease_expires_at": case((ok, bind(
                "b_until", type_=child.c.lease_expires_at.type)), else_=null()),
        }).returning(child.c.id, child.c[link], child.c.status)
        _PAIRS[key] = statement
    return statement


async def insert_claimed(session: AsyncSession, parent: Any, parent_columns: Columns,
                         child: Any, child_columns: Columns, link: str, count: int,
                         claim: InsertClaim) -> tuple[list[int], list[int]] | None:
    """``bulk_inserts.insert_linked_columns`` of one outbox row and its message, the
    row claimed for ``claim`` if nothing is ahead of it; None (nothing run) when that
    cannot be done here (not PostgreSQL on the driver, not one row, a claim already
    made)."""
    connection = await direct(session)
    if connection.adapter is None or count != 1 or claim.decided:
        return None
    parent_table = getattr(parent, "__table__", parent)
    child_table = getattr(child, "__table__", child)
    parent_row = {key: values[0] for key, values in parent_columns.filled(1).items()}
    child_row = {key: values[0] for key, values in child_columns.filled(1).items()}
    if child_row.get("status") != OutboxStatus.PENDING or "locked_by" in child_row:
        return None
    pending, busy = OutboxStatus.unsent()
    row = (await connection.execute(claiming_pair(
        parent_table, tuple(parent_row), child_table, (*child_row, link), link), {
        **{f"p_{key}": value for key, value in parent_row.items()},
        **{f"c_{key}": value for key, value in child_row.items()},
        "b_sid": child_row["subscriber_id"], "b_pending": pending, "b_busy": busy,
        "b_ahead": claim.ahead, "b_sending": OutboxStatus.SENDING,
        "b_worker": claim.worker, "b_until": claim.until})).rows[0]
    row_id, message_id, status = row
    claim.decided.add(row_id)
    if status == OutboxStatus.SENDING:
        claim.claimed.append((row_id, message_id, child_row["subscriber_id"],
                              child_row["channel"], child_row["bot_id"],
                              child_row["recipient"], child_row["payload"]))
    return [message_id], [row_id]

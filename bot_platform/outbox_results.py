"""The outbox, a worker's side after the call: what became of each claimed row.

Split from ``outbox_claims.py`` (claims and leases), which hands its claimed rows' outcomes
here; together with ``outbox.py`` they are the only code that changes outbox rows. Only
rows this worker still holds change: another worker's take-over wins.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from bot_platform import pg_driver
from bot_platform.clock import Clock
from bot_platform.config import WorkerSettings
from bot_platform.database import Database
from bot_platform.direct import direct
from bot_platform.leases import backoff_delay
from bot_platform.models import Broadcast, Message, Outbox, Subscriber
from bot_platform.outbox import hold_rows, skip_rows
from bot_platform.redaction import redact_secrets
from bot_platform.statement_forms import in_ids
from bot_platform.statuses import BroadcastStatus, MessageStatus, OutboxStatus, SubscriberStatus
from bot_platform.types import SendResult, SendStatus

log = logging.getLogger(__name__)

@dataclass(frozen=True, slots=True)
class ClaimedRow:
    """An outbox row this worker holds, with what delivery needs about its subscriber."""

    id: int
    message_id: int
    subscriber_id: int
    channel: str
    bot_id: str
    recipient: str
    payload: dict
    attempts: int
    subscriber_status: str
    last_inbound_at: datetime | None
    broadcast_id: int | None = None
    urgent: bool = False  # someone waits for it (an interactive row)


@dataclass(slots=True)
class Outcome:
    """What to write for one row: a send result, or a release (``release_after``)."""

    row: ClaimedRow
    result: SendResult | None
    skipped: bool = False
    release_after: float = 0.0



def _warn_reclaimed(ids: Iterable[int], owned: set[int]) -> None:
    """A line for each row whose result was not written: another worker took it over."""
    for row_id in ids:
        if row_id not in owned:
            log.warning("outbox row %s was reclaimed by another worker before we "
                        "recorded it", row_id)


def _text_or_none(value: Any) -> str | None:
    """A channel's message id as the text column holds it (an adapter may hand an int)."""
    return None if value is None else str(value)


# ``OutboxResults._write_sent``: $1 the rows, $2 now, $3 their channel message ids, $4
# this worker.
_WRITE_SENT = f"""WITH done AS (
  UPDATE outbox SET status = '{OutboxStatus.SENT.value}', sent_at = $2::timestamp,
    last_error = NULL, locked_by = NULL, lease_expires_at = NULL
  FROM unnest($1::bigint[], $3::varchar[]) AS v(id, channel_message_id)
  WHERE outbox.id = v.id AND outbox.locked_by = $4
  RETURNING outbox.id, outbox.message_id, v.channel_message_id),
marked AS (
  UPDATE messages SET status = '{MessageStatus.SENT.value}',
    channel_message_id = done.channel_message_id, updated_at = $2::timestamp
  FROM done WHERE messages.id = done.message_id)
SELECT id FROM done"""
# ``_WRITE_SENT`` for one row (most groups are one reply), with the same parameters:
# found by its key alone, so even a generic plan made while the outbox was small reads
# that row. The join to ``unnest`` was planned then as a scan of the whole outbox, and a
# prepared statement keeps that plan while its connection lives (~150 buffers a call
# after a minute of ``bench/inbound.py``).
_WRITE_ONE_SENT = f"""WITH done AS (
  UPDATE outbox SET status = '{OutboxStatus.SENT.value}', sent_at = $2::timestamp,
    last_error = NULL, locked_by = NULL, lease_expires_at = NULL
  WHERE outbox.id = $1::bigint AND outbox.locked_by = $4
  RETURNING outbox.id, outbox.message_id),
marked AS (
  UPDATE messages SET status = '{MessageStatus.SENT.value}',
    channel_message_id = $3::varchar, updated_at = $2::timestamp
  FROM done WHERE messages.id = done.message_id)
SELECT id FROM done"""


class OutboxResults:
    """Writes what became of one worker's claimed rows: sent, retried later, failed,
    skipped, or the subscriber gone."""

    def __init__(self, db: Database, clock: Clock, settings: WorkerSettings,
                 worker_id: str) -> None:
        self.db = db
        self.clock = clock
        self.settings = settings
        self.worker_id = worker_id

    async def write(self, outcomes: list[Outcome], urgent: bool = False) -> None:
        """Write the outcomes in one transaction: only rows this worker still holds
        change (another worker's take-over wins). ``urgent``: interactive rows' results
        (``Database.session``)."""
        now = self.clock.now()
        if not self.db.is_sqlite:
            sent = [o for o in outcomes if o.result is not None and not o.skipped
                    and o.result.status == SendStatus.SENT]
            if sent:
                await self._write_sent(sent, now)
                if len(sent) == len(outcomes):
                    return
                outcomes = [o for o in outcomes if not any(o is s for s in sent)]
        planned = [(outcome, *self._values(outcome, now)) for outcome in outcomes]
        by_values: dict[tuple, list[int]] = {}
        for outcome, outbox_values, _ in planned:
            key = tuple(sorted(outbox_values.items()))
            by_values.setdefault(key, []).append(outcome.row.id)
        async with self.db.session(urgent=urgent) as session:
            given_back = [o.row for o, values, _ in planned if o.row.broadcast_id is not None
                          and values.get("status") == OutboxStatus.PENDING]
            stopped = await self._stopped_broadcasts(session, given_back) if given_back else {}
            connection = await direct(session)
            owned: set[int] = set()
            for key, ids in by_values.items():
                owned.update(row[0] for row in (await connection.execute(
                    _result_update(tuple(column for column, _ in key)), {
                        "b_ids": ids, "b_worker": self.worker_id,
                        **{f"v_{column}": value for column, value in key}})).rows)
            if stopped:
                await self._follow_broadcasts(
                    session, [row for row in given_back if row.id in owned], stopped, now)
            by_columns: dict[tuple[str, ...], list[dict[str, Any]]] = {}
            _warn_reclaimed((outcome.row.id for outcome, _, _ in planned), owned)
            for outcome, _, message_values in planned:
                if outcome.row.id in owned and message_values:
                    columns = tuple(sorted(message_values))
                    by_columns.setdefault(columns, []).append(
                        {"m_id": outcome.row.message_id,
                         **{f"v_{k}": v for k, v in message_values.items()}})
            with connection.deferring():  # one trip (on PostgreSQL one statement) for all
                for columns, parameters in by_columns.items():
                    await connection.write(_message_update(columns), parameters)
            await connection.flush()
            for outcome, _, _ in planned:
                if outcome.row.id in owned and outcome.result is not None \
                        and outcome.result.status == SendStatus.BLOCKED:
                    await self._stop_sending_to(session, outcome, now)
        for outcome, _, _ in planned:
            result = outcome.result
            if (result is not None and outcome.row.id in owned and not outcome.skipped
                    and result.status in (SendStatus.FAILED, SendStatus.BLOCKED)):
                log.warning("outbox row %s to %s/%s: %s", outcome.row.id, outcome.row.channel,
                            outcome.row.bot_id, result.reason)

    async def _write_sent(self, outcomes: list[Outcome], now: datetime) -> None:
        """PostgreSQL: rows sent (what nearly every result is), their messages with
        them, in one statement that is its own transaction: one round trip for the
        whole group instead of a session's BEGIN, an UPDATE per kind of values, the
        messages' UPDATE and COMMIT. Only rows this worker still holds change."""
        ids = [o.row.id for o in outcomes]
        naive = now.astimezone(UTC).replace(tzinfo=None) if now.tzinfo else now
        channel_ids = [_text_or_none(o.result.message_id if o.result else None)
                       for o in outcomes]
        sql, params = ((_WRITE_ONE_SENT, (ids[0], naive, channel_ids[0], self.worker_id))
                       if len(ids) == 1 else
                       (_WRITE_SENT, (ids, naive, channel_ids, self.worker_id)))
        found, _ = await pg_driver.fetch_alone(self.db.engine, sql, params)
        _warn_reclaimed(ids, {row[0] for row in found})

    async def _stopped_broadcasts(self, session: AsyncSession, rows: list[ClaimedRow]
                                  ) -> dict[int, str]:
        """The paused or cancelled broadcasts of these rows, read under a share lock
        taken before any row is written: a pause or cancel committing now is waited for
        (and then seen); one that starts later waits for this commit and then finds the
        rows pending, so it holds or skips them itself."""
        query = select(Broadcast.id, Broadcast.status).where(
            Broadcast.id.in_({row.broadcast_id for row in rows}))
        if not self.db.is_sqlite:
            query = query.with_for_update(read=True)
        return {i: status for i, status in (await session.execute(query)).all()
                if status in (BroadcastStatus.PAUSED, BroadcastStatus.CANCELLED)}

    async def _follow_broadcasts(self, session: AsyncSession, rows: list[ClaimedRow],
                                 stopped: dict[int, str], now: datetime) -> None:
        """Broadcast rows given back to wait (a far rate-limit slot, a retry) whose
        broadcast was paused or cancelled meanwhile are held or skipped like its other
        rows, instead of being sent later."""
        for broadcast_id, status in stopped.items():
            ids = [row.id for row in rows if row.broadcast_id == broadcast_id]
            if status == BroadcastStatus.PAUSED:
                await hold_rows(session, Outbox.id.in_(ids))
            else:
                await skip_rows(session, (Outbox.id.in_(ids),), now, "cancelled",
                            (OutboxStatus.PENDING,))

    async def _stop_sending_to(self, session: AsyncSession, outcome: Outcome,
                               now: datetime) -> None:
        """Blocked: the subscriber is gone (unless this was a skip) and nothing else
        queued for them can be delivered now."""
        row = outcome.row
        if not outcome.skipped:
            await session.execute(update(Subscriber).where(
                Subscriber.id == row.subscriber_id).values(
                status=SubscriberStatus.UNSUBSCRIBED, updated_at=now))
        await skip_rows(session, (Outbox.subscriber_id == row.subscriber_id,), now,
                    "unsubscribed", (OutboxStatus.PENDING,))

    def _values(self, outcome: Outcome, now: datetime) -> tuple[dict, dict]:
        """The outbox and message columns to write for one outcome: a retry comes back
        with backoff until ``max_attempts``, a final result ends the row."""
        row, result = outcome.row, outcome.result
        outbox_values: dict = {"locked_by": None, "lease_expires_at": None}
        if result is None:
            outbox_values.update(status=OutboxStatus.PENDING, next_attempt_at=now + timedelta(
                seconds=outcome.release_after))
            return outbox_values, {}
        message_values: dict = {"updated_at": now}
        status = result.status
        if result.reason:  # adapters redact their own; this also covers third-party ones
            result = replace(result, reason=redact_secrets(result.reason))
        if status == SendStatus.SENT:
            outbox_values.update(status=OutboxStatus.SENT, sent_at=now, last_error=None)
            message_values.update(status=MessageStatus.SENT,
                                  channel_message_id=result.message_id)
        elif status == SendStatus.RETRY_AFTER:
            outbox_values.update(
                status=OutboxStatus.PENDING, last_error=result.reason,
                next_attempt_at=now + timedelta(seconds=result.retry_after or 1.0))
        elif status == SendStatus.TRANSIENT:
            attempts, settings = row.attempts + 1, self.settings
            if attempts >= settings.max_attempts:
                reason = f"gave up after {attempts} attempts: {result.reason}"
                outbox_values.update(status=OutboxStatus.FAILED, attempts=attempts,
                                     last_error=reason)
                message_values.update(status=MessageStatus.FAILED, error=reason)
            else:
                delay = backoff_delay(attempts, settings.backoff_base, settings.backoff_max)
                outbox_values.update(status=OutboxStatus.PENDING, attempts=attempts,
                                     last_error=result.reason,
                                     next_attempt_at=now + timedelta(seconds=delay))
        else:
            reason = {SendStatus.BLOCKED: "blocked", SendStatus.OUTSIDE_WINDOW:
                      "outside_window"}.get(status, "failed")
            detail = f"{reason}: {result.reason}" if result.reason else reason
            final = (OutboxStatus.SKIPPED
                     if outcome.skipped or status == SendStatus.OUTSIDE_WINDOW
                     else OutboxStatus.FAILED)
            outbox_values.update(status=final, last_error=detail)
            message_values.update(status=MessageStatus(final), error=detail)
        return outbox_values, (message_values if len(message_values) > 1 else {})


# The statements that write send results, one per set of columns written (a handful of
# kinds of outcome), built once: ``Direct`` runs them on the driver (their compiled form
# is cached per statement), not through the session's ORM-enabled execution.
_RESULT_UPDATES: dict[tuple[str, ...], Any] = {}
_MESSAGE_UPDATES: dict[tuple[str, ...], Any] = {}
_OUTBOX, _MESSAGES = Outbox.__table__, Message.__table__


def _result_update(columns: tuple[str, ...]) -> Any:
    """The outbox rows ``b_ids`` still locked by ``b_worker`` get ``v_<column>``; returns
    their ids."""
    statement = _RESULT_UPDATES.get(columns)
    if statement is None:
        statement = _RESULT_UPDATES[columns] = update(_OUTBOX).where(
            in_ids(_OUTBOX.c.id, "b_ids"), _OUTBOX.c.locked_by == bindparam("b_worker"),
        ).values({column: bindparam(f"v_{column}") for column in columns}).returning(
            _OUTBOX.c.id)
    return statement


def _message_update(columns: tuple[str, ...]) -> Any:
    """Message ``m_id`` gets ``v_<column>``."""
    statement = _MESSAGE_UPDATES.get(columns)
    if statement is None:
        statement = _MESSAGE_UPDATES[columns] = update(_MESSAGES).where(
            _MESSAGES.c.id == bindparam("m_id")).values(
            {column: bindparam(f"v_{column}") for column in columns})
    return statement

"""The delivery worker: claims outbox rows, rate-limits, sends through the channel and
records every ``SendResult``.

Claims take a lease (``locked_by`` + ``lease_expires_at``); a worker that dies leaves rows
that any worker reclaims once the lease has expired, so a row claimed but not sent is sent
exactly once. A subscriber's rows go out strictly in order: only the oldest unsent row of a
subscriber is claimable, and the worker that sent it claims that subscriber's next row
directly. On PostgreSQL claims use ``FOR UPDATE SKIP LOCKED`` so workers share the queue.

A worker sends only what it still owns. Every claim (and every renewal by the heartbeat)
gives the row a deadline on this process's monotonic clock: the moment taken *before* the
claim statement was issued, plus the lease, minus a safety margin. Right before each
messenger call the deadline is checked; a row whose deadline passed (the process was
frozen, SIGSTOP, a swap storm: the monotonic clock keeps running meanwhile) is dropped
here, unsent, because another worker may already have taken it over and sent it. The
stamped ``lease_expires_at`` (minus the margin) is checked against the wall clock as well,
the clock other workers judge the lease by: it also catches a whole-machine pause that a
monotonic clock may not see (a VM paused, then its clock corrected). No round trip.

Interactive rows (replies, timers, agents' messages: not a broadcast's) go first: they are
claimed by a pipeline of their own, together with any earlier row of the same subscriber
that holds them up, and take the next rate-limit slot before a broadcast's rows (``Pacer``).
A reply waits for a slot, not for the broadcast.

Results are written by group commit: every sender waits until its own row is committed,
but rows that finish together share one transaction. A database that goes away (a
restart, a failover) is waited for: a result is never dropped, because a dropped "sent"
would make another worker send the message again once the lease expires.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, bindparam, exists, or_, select, update
from sqlalchemy.orm import aliased

from bot_platform.channels import Channel, SupportsSendMany, redact_secrets
from bot_platform.clock import Clock
from bot_platform.config import BotConfig, WorkerSettings
from bot_platform.database import Database, is_transient_db_error, renew_leases
from bot_platform.logs import log_context
from bot_platform.metrics import Metrics
from bot_platform.models import Broadcast, Message, Outbox, Subscriber
from bot_platform.pipeline import Finished, Pipeline
from bot_platform.ratelimit import Limits, Pacer, RateLimiter
from bot_platform.types import Outgoing, SendResult, SendStatus, past_window

log = logging.getLogger(__name__)

MAX_LIMITER_WAIT = 5.0  # seconds a claimed row may wait for its rate-limit slot in place
# Sends are planned at this share of a bot's configured limit: the messenger counts in its
# own windows and network jitter bunches requests, so planning at 100% provokes 429s.
SEND_HEADROOM = 0.97
MAX_GROUP_COMMIT = 500  # results written in one transaction at most
# A row is sent only if at least this long (at most a quarter lease) is left of its lease:
# room for the clocks of two workers' hosts to disagree and for the request to leave.
LEASE_MARGIN = 2.0


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
    urgent: bool = False  # someone waits for it (see the module docstring)


@dataclass(slots=True)
class _Outcome:
    """What to write for one row: a send result, or a release (``release_after``)."""

    row: ClaimedRow
    result: SendResult | None
    skipped: bool = False
    release_after: float = 0.0


_BOOT_CLOCK = getattr(time, "CLOCK_BOOTTIME", None)


def boot_clock() -> float:
    """Seconds on a clock that never jumps and keeps running while this process is
    stopped (SIGSTOP) and while the machine sleeps (``CLOCK_BOOTTIME`` on Linux;
    ``time.monotonic`` elsewhere, which also runs through a SIGSTOP)."""
    return time.clock_gettime(_BOOT_CLOCK) if _BOOT_CLOCK is not None else time.monotonic()


def backoff_delay(attempt: int, base: float, ceiling: float) -> float:
    """Exponential backoff with full jitter (attempt 1 -> up to ``base`` seconds)."""
    return random.uniform(base / 2, min(ceiling, base * 2 ** (attempt - 1)))


class Delivery:
    """Sends queued messages. One per worker process."""

    def __init__(
        self,
        db: Database,
        channels: Callable[[str, str], Channel | None],
        bots: Callable[[str, str], BotConfig | None],
        limiter: RateLimiter,
        clock: Clock,
        settings: WorkerSettings,
        worker_id: str,
    ) -> None:
        self.db = db
        self.channels = channels
        self.bots = bots
        self.limiter = limiter
        self.pacer = Pacer(limiter)
        self.clock = clock
        self.settings = settings
        self.worker_id = worker_id
        self._commits: list[tuple[_Outcome, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        # Rows claimed and still being worked on here, with the deadlines (monotonic, wall
        # clock) until which each is surely still ours: only these have their leases
        # renewed, so a row whose handling died without a result is retried.
        self.in_hand: dict[int, tuple[float, datetime]] = {}
        self.monotonic: Callable[[], float] = boot_clock  # tests hand in their own
        self.dropped = 0  # rows not sent because their lease lapsed first
        self.metrics = Metrics()  # the platform hands in its own (bot_platform.metrics)
        # Which rows this process may claim at all (None: every row). The console uses it:
        # a ``botp chat`` user's messages are delivered only by that user's terminal.
        self.claim_scope: Any = None

    # ---- claiming ---------------------------------------------------------------------

    def _claimable(self, now: datetime, kind: str | None = None):
        """Rows ready to be claimed; ``kind`` "interactive": only of subscribers with a
        row that is not a broadcast's waiting (their oldest row first, whatever it is);
        "bulk": only broadcasts' rows."""
        earlier = aliased(Outbox)
        ready = or_(
            and_(Outbox.status == "pending", Outbox.next_attempt_at <= now),
            and_(Outbox.status == "sending", Outbox.lease_expires_at < now),
        )
        no_earlier_unsent = ~exists().where(
            earlier.subscriber_id == Outbox.subscriber_id, earlier.id < Outbox.id,
            earlier.status.in_(("pending", "sending")))
        conditions = [ready, no_earlier_unsent]
        if self.claim_scope is not None:
            conditions.append(self.claim_scope)
        if kind == "interactive":
            interactive = aliased(Outbox)
            conditions.append(Outbox.subscriber_id.in_(select(interactive.subscriber_id).where(
                interactive.broadcast_id.is_(None),
                interactive.status.in_(("pending", "sending"))).scalar_subquery()))
        elif kind == "bulk":
            conditions.append(Outbox.broadcast_id.is_not(None))
        return and_(*conditions)

    def _deadline(self, started: float, stamped: datetime) -> tuple[float, datetime]:
        """Until when a lease stamped ``stamped`` by a statement issued after ``started``
        (monotonic) is surely still ours, on either clock."""
        lease = self.settings.lease_seconds
        margin = min(LEASE_MARGIN, lease / 4)
        return started + lease - margin, stamped - timedelta(seconds=margin)

    def owns(self, row: ClaimedRow) -> bool:
        """Whether this worker surely still holds ``row``: checked right before sending."""
        deadline = self.in_hand.get(row.id)
        return (deadline is not None and self.monotonic() < deadline[0]
                and self.clock.now() < deadline[1])

    async def _claim(self, condition, limit: int, urgent: bool = False
                     ) -> tuple[list[ClaimedRow], set[int]]:
        """Claim rows; also returns the subscribers that have more rows waiting."""
        started = self.monotonic()  # before the claim is issued: see ``owns``
        now = self.clock.now()
        lease = now + timedelta(seconds=self.settings.lease_seconds)
        async with self.db.session() as session:
            ids = select(Outbox.id).where(condition).order_by(Outbox.id).limit(limit)
            if not self.db.is_sqlite:
                ids = ids.with_for_update(skip_locked=True)
            claimed = (await session.execute(
                update(Outbox).where(Outbox.id.in_(ids.scalar_subquery()))
                .values(status="sending", locked_by=self.worker_id, lease_expires_at=lease)
                .returning(Outbox.id, Outbox.message_id, Outbox.subscriber_id, Outbox.channel,
                           Outbox.bot_id, Outbox.recipient, Outbox.payload, Outbox.attempts,
                           Outbox.broadcast_id)
                .execution_options(synchronize_session=False))).all()
            if not claimed:
                return [], set()
            deadline = self._deadline(started, lease)
            self.in_hand.update((c.id, deadline) for c in claimed)
            subscriber_ids = {c.subscriber_id for c in claimed}
            subscribers = {row.id: row for row in (await session.execute(
                select(Subscriber.id, Subscriber.status, Subscriber.last_inbound_at).where(
                    Subscriber.id.in_(subscriber_ids)))).all()}
            more = set((await session.scalars(select(Outbox.subscriber_id).where(
                Outbox.subscriber_id.in_(subscriber_ids), Outbox.status == "pending",
            ).distinct())).all())
        rows = []
        for c in sorted(claimed, key=lambda c: c.id):
            sub = subscribers.get(c.subscriber_id)
            rows.append(ClaimedRow(
                c.id, c.message_id, c.subscriber_id, c.channel, c.bot_id, c.recipient,
                c.payload, c.attempts, sub.status if sub else "deleted",
                sub.last_inbound_at if sub else None, c.broadcast_id,
                urgent or c.broadcast_id is None))
        return rows, more

    async def claim_batch(self, limit: int | None = None, kind: str | None = None
                          ) -> tuple[list[ClaimedRow], set[int]]:
        """Claim up to ``limit`` rows: of ``kind`` ("interactive", "bulk"), or interactive
        rows first and then the rest."""
        limit = limit or self.settings.batch_size
        if kind is not None:
            return await self._claim(self._claimable(self.clock.now(), kind), limit,
                                     urgent=kind == "interactive")
        rows, more = await self._claim(self._claimable(self.clock.now(), "interactive"),
                                       limit, urgent=True)
        if len(rows) < limit:
            rest, more_rest = await self._claim(self._claimable(self.clock.now()),
                                                limit - len(rows))
            rows, more = rows + rest, more | more_rest
        return rows, more

    async def claim_next_of(self, subscriber_id: int, urgent: bool = False
                            ) -> tuple[ClaimedRow | None, bool]:
        """The subscriber's next row, and whether yet more are waiting."""
        condition = and_(Outbox.subscriber_id == subscriber_id,
                         self._claimable(self.clock.now()))
        rows, more = await self._claim(condition, 1, urgent)
        return (rows[0] if rows else None), subscriber_id in more

    async def renew_leases(self) -> int:
        """Extend the lease of every row in hand: a lease expires when its holder is dead
        (or dropped the row), not when it is slow (a row may wait in the pipeline for its
        rate-limit slot longer than a lease). A renewed row's deadline moves only as far
        as the renewal proves; a row not renewed keeps its deadline (it is no longer
        ours, or no longer in hand). Returns how many rows were renewed."""
        held = dict(self.in_hand)
        started = self.monotonic()
        until = self.clock.now() + timedelta(seconds=self.settings.lease_seconds)
        renewed = await renew_leases(self.db, Outbox, held, worker_id=self.worker_id,
                                     status="sending", until=until)
        deadline = self._deadline(started, until)
        for row_id in renewed:
            if self.in_hand.get(row_id) == held[row_id]:  # not finished nor re-claimed since
                self.in_hand[row_id] = deadline
        return len(renewed)

    # ---- sending ----------------------------------------------------------------------

    async def run_once(self) -> int:
        """Claim one batch and deliver it; returns how many rows were handled."""
        rows, more = await self.claim_batch()
        if not rows:
            return 0
        return await self._deliver_claimed(rows, more,
                                           asyncio.Semaphore(self.settings.concurrency))

    async def _deliver_claimed(self, rows: list[ClaimedRow], more: set[int],
                               semaphore: asyncio.Semaphore,
                               finished: Finished = lambda n: None) -> int:
        """Deliver claimed rows (and each subscriber's later rows, in order)."""
        handled = 0
        groups, rows = self._batchable(rows, more)

        async def batch(group: list[ClaimedRow]) -> None:
            nonlocal handled
            try:
                async with semaphore:
                    handled += await self.deliver_many(group)
            finally:
                finished(len(group))

        async def subscriber_queue(row: ClaimedRow | None) -> None:
            nonlocal handled
            has_more = row is not None and row.subscriber_id in more
            try:
                async with semaphore:
                    while row is not None:
                        status = await self.deliver(row)
                        handled += 1
                        if status != SendStatus.SENT or not has_more:
                            return
                        row, has_more = await self.claim_next_of(row.subscriber_id,
                                                                 row.urgent)
            finally:
                finished(1)

        await asyncio.gather(*(batch(g) for g in groups),
                             *(subscriber_queue(row) for row in rows))
        return handled

    def pipeline(self, kind: str | None = None) -> Pipeline:
        """Deliver continuously: the next rows are claimed while earlier ones are still
        being sent (at most ``batch_size`` held), so a bot's rate is used without pauses.
        ``kind``: only interactive rows, or only broadcasts' (see ``pipelines``)."""
        semaphore = asyncio.Semaphore(self.settings.concurrency)

        async def claim(limit: int) -> tuple[int, tuple[list[ClaimedRow], set[int]]]:
            rows, more = await self.claim_batch(limit, kind)
            return len(rows), (rows, more)

        async def handle(claimed: tuple[list[ClaimedRow], set[int]],
                         finished: Finished) -> int:
            rows, more = claimed
            return await self._deliver_claimed(rows, more, semaphore, finished)

        return Pipeline(f"delivery ({kind or 'all'})", self.settings.batch_size, claim,
                        handle)

    def pipelines(self) -> list[Pipeline]:
        """Interactive rows and broadcasts' rows in pipelines of their own: a reply never
        waits for room in a pipeline full of a broadcast's rows."""
        return [self.pipeline("interactive"), self.pipeline("bulk")]

    def _batchable(self, rows: list[ClaimedRow], more: set[int]
                   ) -> tuple[list[list[ClaimedRow]], list[ClaimedRow]]:
        """Broadcast rows with the same message for a channel that can send to many in
        one call (Viber's ``broadcast_message``); the rest go one by one."""
        groups: dict[tuple[str, str, int, str], list[ClaimedRow]] = {}
        single = []
        for row in rows:
            channel = self.channels(row.channel, row.bot_id)
            if (row.broadcast_id is None or row.subscriber_id in more or channel is None
                    or row.subscriber_status != "subscribed"
                    or channel.capabilities.batch_size < 2  # cheaper than the isinstance
                    or not isinstance(channel, SupportsSendMany)):
                single.append(row)
                continue
            key = (row.channel, row.bot_id, row.broadcast_id,
                   json.dumps(row.payload, sort_keys=True))
            groups.setdefault(key, []).append(row)
        batches = []
        for group in groups.values():
            if len(group) == 1:
                single.extend(group)
                continue
            size = self.channels(group[0].channel, group[0].bot_id).capabilities.batch_size
            batches.extend(group[i:i + size] for i in range(0, len(group), size))
        return batches, single

    async def deliver_many(self, rows: list[ClaimedRow]) -> int:
        """One API call for many recipients of the same message; a result per row."""
        try:
            with log_context(bot=rows[0].bot_id, channel=rows[0].channel):
                return await self._deliver_many(rows)
        finally:
            for row in rows:
                self.in_hand.pop(row.id, None)

    async def _deliver_many(self, rows: list[ClaimedRow]) -> int:
        first = rows[0]
        channel = self.channels(first.channel, first.bot_id)
        assert isinstance(channel, SupportsSendMany)  # _batchable grouped only such rows
        limits = self._limits(channel, self.bots(first.channel, first.bot_id))
        bot_only = Limits(per_bot=limits.per_bot, per_chat=math.inf)
        delay = await self._take_slot(f"{first.channel}:{first.bot_id}", "*", bot_only,
                                      first.urgent)
        if delay > MAX_LIMITER_WAIT:
            await asyncio.gather(*(self.release(row, delay) for row in rows))
            return len(rows)
        handled = len(rows)
        rows = [row for row in rows if self._still_ours(row)]
        if not rows:
            return handled
        first = rows[0]
        message = Outgoing.model_validate(first.payload)
        try:
            results = await channel.send_many([r.recipient for r in rows], message)
        except Exception as error:  # an adapter bug must not kill the worker
            log.exception("channel %s/%s raised on send_many", first.channel, first.bot_id)
            results = {}
            failure = SendResult.transient(f"adapter error: {type(error).__name__}")
        else:
            failure = SendResult.transient("no result for this recipient")
        for row in rows:
            result = results.get(row.recipient, failure)
            if result.status == SendStatus.RETRY_AFTER:
                await self.limiter.pause(f"{row.channel}:{row.bot_id}",
                                         result.retry_after or 1.0)
            await self.record(row, result)
        return handled

    def _limits(self, channel: Channel, bot: BotConfig | None) -> Limits:
        caps = channel.capabilities
        per_bot = (bot.messages_per_second if bot and bot.messages_per_second
                   else caps.messages_per_second)
        per_chat = (bot.per_chat_per_second if bot and bot.per_chat_per_second
                    else caps.per_chat_per_second)
        return Limits(per_bot=per_bot * SEND_HEADROOM if per_bot else math.inf,
                      per_chat=per_chat or math.inf, chat_burst=caps.per_chat_burst)

    async def deliver(self, row: ClaimedRow) -> SendStatus | None:
        """Send one claimed row and record the result; returns the send status (None when
        the row was put back to wait for its rate-limit slot)."""
        try:
            with log_context(bot=row.bot_id, channel=row.channel,
                             subscriber_id=row.subscriber_id):
                return await self._deliver(row)
        finally:
            self.in_hand.pop(row.id, None)

    async def _deliver(self, row: ClaimedRow) -> SendStatus | None:
        channel = self.channels(row.channel, row.bot_id)
        if channel is None:
            await self.record(row, SendResult.failed(
                f"bot {row.channel}/{row.bot_id} is not configured"))
            return SendStatus.FAILED
        try:
            message = Outgoing.model_validate(row.payload)
        except ValueError as error:  # a row no send can fix: fail it, do not retry it
            await self.record(row, SendResult.failed(f"invalid message: {error}"))
            return SendStatus.FAILED
        if row.subscriber_status != "subscribed":
            await self.record(row, SendResult(SendStatus.BLOCKED, reason="unsubscribed"),
                              skipped=True)
            return SendStatus.BLOCKED
        window = channel.capabilities.reply_window
        if window is not None and (row.last_inbound_at is None
                                   or self.clock.now() - row.last_inbound_at > window):
            passed = past_window(message, channel.capabilities)
            if passed is None:
                await self.record(row, SendResult.outside_window())
                return SendStatus.OUTSIDE_WINDOW
            message = passed
        limits = self._limits(channel, self.bots(row.channel, row.bot_id))
        delay = await self._take_slot(f"{row.channel}:{row.bot_id}", row.recipient, limits,
                                      row.urgent)
        if delay > MAX_LIMITER_WAIT:
            await self.release(row, delay)
            return None
        if not self._still_ours(row):
            return None
        try:
            result = await channel.send(row.recipient, message)
        except Exception as error:  # an adapter bug must not kill the worker
            log.exception("channel %s/%s raised on send", row.channel, row.bot_id)
            result = SendResult.transient(f"adapter error: {type(error).__name__}")
        if result.status == SendStatus.RETRY_AFTER:
            await self.limiter.pause(f"{row.channel}:{row.bot_id}", result.retry_after or 1.0)
        await self.record(row, result)
        return result.status

    def _still_ours(self, row: ClaimedRow) -> bool:
        """Checked right before the messenger call: a row whose lease may have lapsed is
        dropped unsent (no result is written: it is, or soon will be, another worker's)."""
        if self.owns(row):
            return True
        self.dropped += 1
        log.warning("outbox row %s: its lease lapsed before it was sent (was this process "
                    "paused?); left to the worker that takes it over", row.id)
        return False

    async def _take_slot(self, bot: str, chat: str, limits: Limits,
                         urgent: bool = False) -> float:
        """Wait for a send slot (0: send now; more than ``MAX_LIMITER_WAIT``: the row
        goes back). If the limiter cannot be asked (Redis away), the row waits."""
        try:
            return await self.pacer.wait(bot, chat, limits, MAX_LIMITER_WAIT, urgent)
        except Exception as error:
            log.warning("rate limiter unavailable (%s: %s); holding sends of %s",
                        type(error).__name__, error, bot)
            return MAX_LIMITER_WAIT * 2

    async def release(self, row: ClaimedRow, delay: float) -> None:
        """Give a row back without counting an attempt (its rate-limit slot is far off)."""
        await self._commit(_Outcome(row, None, release_after=delay))

    async def record(self, row: ClaimedRow, result: SendResult, skipped: bool = False) -> None:
        """Write what happened to one row; returns once it is committed."""
        self.metrics.send_result(row.channel, result, skipped)
        await self._commit(_Outcome(row, result, skipped))

    # ---- group commit -------------------------------------------------------------------

    async def _commit(self, outcome: _Outcome) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._commits.append((outcome, future))
        if self._flusher is None or self._flusher.done():
            # In a context of its own: it writes many senders' rows, and its log lines
            # must not carry the first sender's subscriber (bot_platform.logs).
            self._flusher = asyncio.create_task(self._flush(), context=contextvars.Context())
        await asyncio.shield(future)  # a cancelled sender must not lose its row's result

    async def _flush(self) -> None:
        while self._commits:
            await asyncio.sleep(0)  # senders answered in this same moment join the batch
            batch = self._commits[:MAX_GROUP_COMMIT]
            del self._commits[:MAX_GROUP_COMMIT]
            try:
                await self._write_until_stored([outcome for outcome, _ in batch])
            except BaseException as error:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                if not isinstance(error, Exception):
                    raise
            else:
                for _, future in batch:
                    if not future.done():
                        future.set_result(None)

    async def _write_until_stored(self, outcomes: list[_Outcome]) -> None:
        """Write, waiting out a database that went away (for up to a lease: after that
        the rows are other workers' again, and a late write would be refused anyway)."""
        deadline = time.monotonic() + self.settings.lease_seconds
        attempt = 0
        while True:
            try:
                await self._write(outcomes)
                return
            except Exception as error:
                attempt += 1
                if not is_transient_db_error(error) or time.monotonic() > deadline:
                    raise
                log.warning("recording %d send results failed (%s); retrying",
                            len(outcomes), type(error).__name__)
                await asyncio.sleep(min(5.0, 0.1 * 2 ** attempt))

    async def _write(self, outcomes: list[_Outcome]) -> None:
        now = self.clock.now()
        planned = [(outcome, *self._values(outcome, now)) for outcome in outcomes]
        by_values: dict[tuple, list[int]] = {}
        for outcome, outbox_values, _ in planned:
            key = tuple(sorted(outbox_values.items()))
            by_values.setdefault(key, []).append(outcome.row.id)
        async with self.db.session() as session:
            given_back = [o.row for o, values, _ in planned if o.row.broadcast_id is not None
                          and values.get("status") == "pending"]
            stopped = await self._stopped_broadcasts(session, given_back) if given_back else {}
            owned: set[int] = set()
            for key, ids in by_values.items():
                owned.update((await session.scalars(
                    update(Outbox).where(Outbox.id.in_(ids),
                                         Outbox.locked_by == self.worker_id)
                    .values(dict(key)).returning(Outbox.id)
                    .execution_options(synchronize_session=False))).all())
            if stopped:
                await self._follow_broadcasts(
                    session, [row for row in given_back if row.id in owned], stopped, now)
            by_columns: dict[tuple[str, ...], list[dict[str, Any]]] = {}
            for outcome, _, message_values in planned:
                if outcome.row.id not in owned:
                    log.warning("outbox row %s was reclaimed by another worker before we "
                                "recorded it", outcome.row.id)
                elif message_values:
                    columns = tuple(sorted(message_values))
                    by_columns.setdefault(columns, []).append(
                        {"m_id": outcome.row.message_id,
                         **{f"v_{k}": v for k, v in message_values.items()}})
            table = Message.__table__
            for columns, parameters in by_columns.items():
                await session.execute(
                    table.update().where(table.c.id == bindparam("m_id"))
                    .values({column: bindparam(f"v_{column}") for column in columns}),
                    parameters)
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

    async def _stopped_broadcasts(self, session: Any, rows: list[ClaimedRow]
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
                if status in ("paused", "cancelled")}

    async def _follow_broadcasts(self, session: Any, rows: list[ClaimedRow],
                                 stopped: dict[int, str], now: datetime) -> None:
        """Broadcast rows given back to wait (a far rate-limit slot, a retry) whose
        broadcast was paused or cancelled meanwhile are held or skipped like its other
        rows, instead of being sent later."""
        for broadcast_id, status in stopped.items():
            mine = [row for row in rows if row.broadcast_id == broadcast_id]
            ids = [row.id for row in mine]
            if status == "paused":
                await session.execute(update(Outbox).where(
                    Outbox.id.in_(ids), Outbox.status == "pending").values(status="held"))
                continue
            await session.execute(update(Message).where(Message.id.in_(
                [row.message_id for row in mine])).values(
                status="skipped", error="cancelled", updated_at=now))
            await session.execute(update(Outbox).where(
                Outbox.id.in_(ids), Outbox.status == "pending").values(
                status="skipped", last_error="cancelled"))

    async def _stop_sending_to(self, session: Any, outcome: _Outcome, now: datetime) -> None:
        """Blocked: the subscriber is gone (unless this was a skip) and nothing else
        queued for them can be delivered now."""
        row = outcome.row
        if not outcome.skipped:
            await session.execute(update(Subscriber).where(
                Subscriber.id == row.subscriber_id).values(
                status="unsubscribed", updated_at=now))
        pending = select(Outbox.message_id).where(
            Outbox.subscriber_id == row.subscriber_id, Outbox.status == "pending")
        await session.execute(update(Message).where(Message.id.in_(
            pending.scalar_subquery())).values(status="skipped", error="unsubscribed",
                                               updated_at=now))
        await session.execute(update(Outbox).where(
            Outbox.subscriber_id == row.subscriber_id, Outbox.status == "pending",
        ).values(status="skipped", last_error="unsubscribed"))

    def _values(self, outcome: _Outcome, now: datetime) -> tuple[dict, dict]:
        """The outbox and message columns to write for one outcome."""
        row, result = outcome.row, outcome.result
        outbox_values: dict = {"locked_by": None, "lease_expires_at": None}
        if result is None:
            outbox_values.update(status="pending", next_attempt_at=now + timedelta(
                seconds=outcome.release_after))
            return outbox_values, {}
        message_values: dict = {"updated_at": now}
        status = result.status
        if result.reason:  # adapters redact their own; this also covers third-party ones
            result = replace(result, reason=redact_secrets(result.reason))
        if status == SendStatus.SENT:
            outbox_values.update(status="sent", sent_at=now, last_error=None)
            message_values.update(status="sent", channel_message_id=result.message_id)
        elif status == SendStatus.RETRY_AFTER:
            outbox_values.update(
                status="pending", last_error=result.reason,
                next_attempt_at=now + timedelta(seconds=result.retry_after or 1.0))
        elif status == SendStatus.TRANSIENT:
            attempts = row.attempts + 1
            if attempts >= self.settings.max_attempts:
                reason = f"gave up after {attempts} attempts: {result.reason}"
                outbox_values.update(status="failed", attempts=attempts, last_error=reason)
                message_values.update(status="failed", error=reason)
            else:
                delay = backoff_delay(attempts, self.settings.backoff_base,
                                      self.settings.backoff_max)
                outbox_values.update(status="pending", attempts=attempts,
                                     last_error=result.reason,
                                     next_attempt_at=now + timedelta(seconds=delay))
        else:
            reason = {SendStatus.BLOCKED: "blocked", SendStatus.OUTSIDE_WINDOW:
                      "outside_window"}.get(status, "failed")
            detail = f"{reason}: {result.reason}" if result.reason else reason
            final = ("skipped" if outcome.skipped or status == SendStatus.OUTSIDE_WINDOW
                     else "failed")
            outbox_values.update(status=final, last_error=detail)
            message_values.update(status=final, error=detail)
        return outbox_values, (message_values if len(message_values) > 1 else {})


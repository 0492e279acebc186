"""The delivery worker: takes claimed outbox rows, rate-limits, sends through the channel
and hands every ``SendResult`` to the outbox (``bot_platform.outbox`` owns the rows:
claims, leases, statuses).

A subscriber's rows go out strictly in order: the worker that sent a row claims that
subscriber's next row directly. A worker sends only what it still owns: right before
each messenger call the row's lease deadline is checked (``bot_platform.leases``); a row
whose lease may have lapsed (the process was frozen) is dropped here, unsent, because
another worker may already have taken it over and sent it. No transaction is open
across a messenger call.

Interactive rows (replies, timers, agents' messages: not a broadcast's) go first: they are
claimed by a pipeline of their own and take the next rate-limit slot before a
broadcast's rows (``Pacer``). A reply waits for a slot, not for the broadcast. While
the engine has turns in flight in this process, a broadcast's row waits briefly before its
send (``bot_platform.pressure``): they share the event loop and, on SQLite, the connection.

Results are written by group commit: every sender waits until its own row is committed,
but rows that finish together share one transaction. A database that goes away (a
restart, a failover) is waited for: a result is never dropped, because a dropped "sent"
would make another worker send the message again once the lease expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections.abc import Callable
from typing import Any

from bot_platform.channels import Channel, SupportsSendMany, supports
from bot_platform.clock import Clock
from bot_platform.config import BotConfig, WorkerSettings
from bot_platform.database import Database
from bot_platform.group_commit import LINGER, ResultWriter
from bot_platform.logs import log_context
from bot_platform.metrics import Metrics
from bot_platform.outbox_claims import OutboxClaims
from bot_platform.outbox_results import ClaimedRow, Outcome
from bot_platform.pipeline import Finished, Pipeline
from bot_platform.pressure import InteractivePressure
from bot_platform.ratelimit import Limits, Pacer, RateLimiter
from bot_platform.statuses import SubscriberStatus
from bot_platform.types import Outgoing, SendResult, SendStatus, past_window

log = logging.getLogger(__name__)

MAX_LIMITER_WAIT = 5.0  # seconds a claimed row may wait for its rate-limit slot in place
# Sends are planned at this share of a bot's configured limit: the messenger counts in its
# own windows and network jitter bunches requests, so planning at 100% provokes 429s.
SEND_HEADROOM = 0.97
def limits_for(channel: Channel, bot: BotConfig | None) -> Limits:
    """A bot's send limits: its own settings, else the channel's, planned with headroom."""
    caps = channel.capabilities
    per_bot = (bot.messages_per_second if bot and bot.messages_per_second
               else caps.messages_per_second)
    per_chat = (bot.per_chat_per_second if bot and bot.per_chat_per_second
                else caps.per_chat_per_second)
    return Limits(per_bot=per_bot * SEND_HEADROOM if per_bot else math.inf,
                  per_chat=per_chat or math.inf, chat_burst=caps.per_chat_burst)


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
        self.outbox = OutboxClaims(db, clock, settings, worker_id)
        # A broadcast's results linger on PostgreSQL (a WAL flush per commit); SQLite's
        # commits in WAL mode are cheap, and one worker's groups big already.
        self.results = ResultWriter(self.outbox, settings,
                                    linger=0.0 if db is None or db.is_sqlite else LINGER)
        self.dropped = 0  # rows not sent because their lease lapsed first
        self.metrics = Metrics()  # the platform hands in its own (bot_platform.metrics)
        # The engine's turns in flight in this process (the platform shares its own).
        self.pressure = InteractivePressure()

    # ---- what the outbox holds for this worker ------------------------------------------

    @property
    def in_hand(self) -> dict[int, Any]:
        """Rows claimed here and still being worked on, with their lease deadlines."""
        return self.outbox.leases.in_hand

    @property
    def monotonic(self) -> Callable[[], float]:
        """The clock lease deadlines run on (``leases.boot_clock``; tests hand in theirs)."""
        return self.outbox.leases.monotonic

    @monotonic.setter
    def monotonic(self, clock: Callable[[], float]) -> None:
        self.outbox.leases.monotonic = clock

    @property
    def claim_scope(self) -> Any:
        """Which rows this process may claim at all (None: every row)."""
        return self.outbox.scope

    @claim_scope.setter
    def claim_scope(self, scope: Any) -> None:
        self.outbox.scope = scope

    def owns(self, row: ClaimedRow) -> bool:
        """Whether this worker surely still holds ``row``: checked right before sending."""
        return self.outbox.leases.owns(row.id)

    async def claim_batch(self, limit: int | None = None, kind: str | None = None
                          ) -> tuple[list[ClaimedRow], set[int]]:
        """Claim up to ``limit`` rows (``OutboxClaims.claim_batch``)."""
        return await self.outbox.claim_batch(limit or self.settings.batch_size, kind)

    async def renew_leases(self) -> int:
        """The heartbeat: extend the lease of every row in hand (``Leases.renew``)."""
        return await self.outbox.leases.renew()

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
                while row is not None:
                    # The semaphore bounds sends in flight, not results waiting for
                    # their commit (see ``deliver``).
                    status = await self.deliver(row, semaphore)
                    handled += 1
                    if status != SendStatus.SENT or not has_more:
                        return
                    row, has_more = await self.outbox.claim_next_of(
                        row.subscriber_id, row.urgent)
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
            if kind == "bulk":  # a claim holds the (SQLite) connection a while
                await self.pressure.yield_to_interactive()
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
                    or row.subscriber_status != SubscriberStatus.SUBSCRIBED
                    or channel.capabilities.batch_size < 2  # cheaper than the isinstance
                    or not supports(channel, SupportsSendMany)):
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
                self.outbox.leases.let_go(row.id)

    async def _deliver_many(self, rows: list[ClaimedRow]) -> int:
        first = rows[0]
        channel = self.channels(first.channel, first.bot_id)
        assert isinstance(channel, SupportsSendMany)  # _batchable grouped only such rows
        limits = limits_for(channel, self.bots(first.channel, first.bot_id))
        bot_only = Limits(per_bot=limits.per_bot, per_chat=math.inf)
        if not first.urgent:
            await self.pressure.yield_to_interactive()
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

    async def deliver(self, row: ClaimedRow, sending: asyncio.Semaphore | None = None
                      ) -> SendStatus | None:
        """Send one claimed row and record the result; returns the send status (None when
        the row was put back to wait for its rate-limit slot). ``sending`` is held from
        the rate-limit slot through the messenger call only: senders waiting for their
        result's commit (a long SQLite transaction queueing a broadcast batch) do not
        keep others from the pacer, whose slots would go unused meanwhile."""
        try:
            with log_context(bot=row.bot_id, channel=row.channel,
                             subscriber_id=row.subscriber_id):
                return await self._deliver(row, sending or contextlib.nullcontext())
        finally:
            self.outbox.leases.let_go(row.id)
            if row.urgent:
                self.pressure.sent(row.id)

    async def _deliver(self, row: ClaimedRow, sending: Any) -> SendStatus | None:
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
        if row.subscriber_status != SubscriberStatus.SUBSCRIBED:
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
        limits = limits_for(channel, self.bots(row.channel, row.bot_id))
        if row.broadcast_id is not None and not row.urgent:
            await self.pressure.yield_to_interactive()
        async with sending:
            delay = await self._take_slot(f"{row.channel}:{row.bot_id}", row.recipient,
                                          limits, row.urgent)
            if delay <= MAX_LIMITER_WAIT:
                if not self._still_ours(row):
                    return None
                try:
                    result = await channel.send(row.recipient, message)
                except Exception as error:  # an adapter bug must not kill the worker
                    log.exception("channel %s/%s raised on send", row.channel, row.bot_id)
                    result = SendResult.transient(f"adapter error: {type(error).__name__}")
        if delay > MAX_LIMITER_WAIT:
            await self.release(row, delay)
            return None
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
        await self.results.store(Outcome(row, None, release_after=delay))

    async def record(self, row: ClaimedRow, result: SendResult, skipped: bool = False) -> None:
        """Write what happened to one row; returns once it is committed."""
        self.metrics.send_result(row.channel, result, skipped)
        await self.results.store(Outcome(row, result, skipped))

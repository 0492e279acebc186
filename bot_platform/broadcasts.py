"""Broadcasts: a localized message to a segment, optionally split into A/B variants.

Starting a broadcast snapshots its recipients (one row each); a ``broadcast_send`` job
then turns pending recipients into outbox rows in batches, marking each recipient queued
in the same transaction, so a crash or a pause resumes without re-sending or skipping
anyone. Delivery goes through the ordinary worker at each bot's rate. Pausing holds the
queued rows back from the worker; cancelling skips them.

Every status change (start, pause, resume, cancel, the scheduled start, completion) is a
compare-and-set on the broadcasts row, and the send job holds that row locked while it
queues a batch: of concurrent changes one wins, batches of one broadcast never overlap,
and a pause or cancel is ordered before or after a whole batch, never inside one.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator
from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from bot_platform import broadcast_queue, outbox
from bot_platform.broadcast_figures import stats as stats  # the API's figures
from bot_platform.broadcast_queue import SEND_KIND
from bot_platform.database import insert_ignore
from bot_platform.inbound import Engine
from bot_platform.models import (
    Broadcast,
    BroadcastRecipient,
    Job,
    Outbox,
    Subscriber,
)
from bot_platform.segments import Filter, compile_filter
from bot_platform.statuses import (
    BroadcastStatus,
    JobStatus,
    OutboxStatus,
    RecipientStatus,
)
from bot_platform.text import StorableText
from bot_platform.types import Button, Card, QuickReply

BATCH = 500
AHEAD = 2000  # broadcast rows waiting for the workers that are plenty (``SendJob``)
RELAXED_BATCH, RELAXED_WAIT, TALKING = 100, 1.0, 10.0  # recipients, seconds, seconds
SNAPSHOT_CHUNK = 5000  # recipients read and inserted at a time when a broadcast starts
FILTER = TypeAdapter(Filter)


class Content(BaseModel):
    """One localized message."""

    model_config = ConfigDict(extra="forbid")

    text: StorableText = Field("", max_length=4096 * 4)
    buttons: list[Button] = Field(default_factory=list, max_length=10)
    quick_replies: list[QuickReply] = Field(default_factory=list, max_length=13)
    image_url: str | None = None
    cards: list[Card] = Field(default_factory=list, max_length=10)

    @model_validator(mode="after")
    def _something(self) -> Content:
        if not (self.text or self.image_url or self.cards):
            raise ValueError("a message needs text, an image or cards")
        return self


class Variant(BaseModel):
    """An A/B variant: a share of the recipients and its message per locale, or a flow
    to start for them."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,32}$")
    percent: int = Field(ge=1, le=100)
    messages: dict[str, Content] | None = Field(None, description="locale -> message")
    flow: str | None = Field(None, description="a flow to start instead of a message")

    @model_validator(mode="after")
    def _one(self) -> Variant:
        if (self.messages is None) == (self.flow is None):
            raise ValueError("a variant has either messages or a flow")
        if self.messages is not None and not self.messages:
            raise ValueError("messages needs at least one locale")
        return self


class BroadcastCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: StorableText = Field(min_length=1, max_length=128)
    filter: dict[str, Any] = Field(description="A segment filter")
    variants: list[Variant] = Field(min_length=1, max_length=10)
    tag: StorableText | None = Field(default=None, max_length=64,
                                     description="Facebook message tag (no promotions)")
    scheduled_at: datetime | None = None
    local_time: str | None = Field(
        default=None, pattern=r"^([01]\d|2[0-3]):[0-5]\d$",
        description="send at this time of day in each subscriber's time zone (attribute "
                    "'timezone', e.g. Europe/Kyiv; UTC when unknown)")

    @model_validator(mode="after")
    def _valid(self) -> BroadcastCreate:
        FILTER.validate_python(self.filter)
        if sum(v.percent for v in self.variants) != 100:
            raise ValueError("variant percents must add up to 100")
        if len({v.name for v in self.variants}) != len(self.variants):
            raise ValueError("variant names must differ")
        return self


def local_moment(local_time: str | None, attributes: dict[str, Any] | None,
                 now: datetime) -> datetime | None:
    """The next moment it is ``local_time`` in the subscriber's time zone."""
    if not local_time:
        return None
    try:
        zone = ZoneInfo(str((attributes or {}).get("timezone") or "UTC"))
    except (ZoneInfoNotFoundError, ValueError):
        zone = ZoneInfo("UTC")
    hour, minute = (int(part) for part in local_time.split(":"))
    local_now = now.astimezone(zone)
    moment = local_now.replace(hour=hour, minute=minute, second=0, microsecond=0)
    if moment < local_now:
        moment += timedelta(days=1)
    return moment.astimezone(UTC)


def variant_for(subscriber_id: int, broadcast_id: int, variants: list[dict[str, Any]]) -> str:
    """A stable, even split: the same subscriber always lands in the same variant."""
    bucket = int(hashlib.blake2b(f"{broadcast_id}:{subscriber_id}".encode(),
                                 digest_size=4).hexdigest(), 16) % 100
    edge = 0
    for variant in variants:
        edge += int(variant["percent"])
        if bucket < edge:
            return str(variant["name"])
    return str(variants[-1]["name"])


async def create(session: AsyncSession, body: BroadcastCreate, now: datetime) -> Broadcast:
    broadcast = Broadcast(
        name=body.name, status=BroadcastStatus.DRAFT, segment=body.filter,
        variants=[v.model_dump(mode="json") for v in body.variants], tag=body.tag,
        scheduled_at=body.scheduled_at, local_time=body.local_time, created_at=now)
    session.add(broadcast)
    await session.flush()
    return broadcast


class Conflict(ValueError):
    """The broadcast's status does not allow this change (the API answers 409)."""


class NotFound(LookupError):
    """No such broadcast (the API answers 404)."""


async def _transition(session: AsyncSession, broadcast_id: int, expected: tuple[str, ...],
                      action: str, *, unsent: bool = False, **values: Any) -> Broadcast:
    """Move the broadcast to a new status only if it is in one of ``expected`` (or, with
    ``unsent``, completed but with queued rows still waiting for the delivery worker): one
    ``UPDATE ... WHERE status IN (...)`` whose row count decides, so of two concurrent
    callers exactly one wins (on PostgreSQL the loser waits for the winner's commit and
    then sees the new status). Returns the broadcast as it is now; its row stays locked
    until the transaction ends, which orders this change against the send job."""
    allowed = Broadcast.status.in_(expected)
    if unsent:
        allowed = or_(allowed, and_(Broadcast.status == BroadcastStatus.COMPLETED,
                                    outbox.broadcast_waits(broadcast_id)))
    won = await session.execute(update(Broadcast).where(
        Broadcast.id == broadcast_id, allowed).values(**values)
        .execution_options(synchronize_session=False))
    broadcast = await session.get(Broadcast, broadcast_id, populate_existing=True)
    if broadcast is None:
        raise NotFound(f"no broadcast {broadcast_id}")
    if won.rowcount != 1:
        raise Conflict(f"a {broadcast.status} broadcast cannot {action}")
    return broadcast


async def start(session: AsyncSession, broadcast_id: int, now: datetime) -> Broadcast:
    """Start a draft: snapshot its recipients and queue the send job, or, when
    ``scheduled_at`` is still ahead, mark it scheduled (the job starts it then). Only a
    draft starts: a second start of a scheduled or running broadcast is a ``Conflict``."""
    draft = await session.get(Broadcast, broadcast_id)
    if draft is None:
        raise NotFound(f"no broadcast {broadcast_id}")
    if draft.scheduled_at is not None and draft.scheduled_at > now:
        broadcast = await _transition(session, broadcast_id, (BroadcastStatus.DRAFT,), "start",
                                      status=BroadcastStatus.SCHEDULED)
        session.add(Job(kind=SEND_KIND, due_at=broadcast.scheduled_at, created_at=now,
                        payload={"broadcast_id": broadcast.id, "start": True}))
        return broadcast
    broadcast = await _transition(session, broadcast_id, (BroadcastStatus.DRAFT,), "start",
                                  status=BroadcastStatus.RUNNING, started_at=now)
    await _snapshot(session, broadcast, now)
    return broadcast


async def _snapshot(session: AsyncSession, broadcast: Broadcast, now: datetime) -> int:
    """The recipients (one row each) and the first send job; returns how many. The
    segment's rows stream in and go out ``SNAPSHOT_CHUNK`` at a time: the process's memory
    does not grow with the segment (a list of 380,000 recipients took ~300 MB)."""
    spec = FILTER.validate_python(broadcast.segment)
    condition = compile_filter(spec, now=now, dialect=session.bind.dialect.name)
    # Everyone the segment names; the unsubscribed are skipped (and counted) when queued.
    # Their attributes only matter for a local time of day (the time zone).
    local_time = broadcast.local_time
    columns = (Subscriber.id, Subscriber.attributes) if local_time else (Subscriber.id,)
    found = await session.stream(select(*columns).where(condition).order_by(Subscriber.id))
    targeted = 0
    async for chunk in found.partitions(SNAPSHOT_CHUNK):
        await session.execute(insert_ignore(session, BroadcastRecipient), [
            {"broadcast_id": broadcast.id, "subscriber_id": row[0],
             "status": RecipientStatus.PENDING,
             "variant": variant_for(row[0], broadcast.id, broadcast.variants),
             "due_at": local_moment(local_time, row[1], now) if local_time else None}
            for row in chunk])
        targeted += len(chunk)
    session.add(Job(kind=SEND_KIND, due_at=now, created_at=now,
                    payload={"broadcast_id": broadcast.id}))
    return targeted


async def pause(session: AsyncSession, broadcast_id: int) -> Broadcast:
    """Stop queueing and hold queued rows the delivery worker has not claimed yet. A
    completed broadcast (everyone queued) pauses too while some of its rows wait."""
    broadcast = await _transition(session, broadcast_id, (BroadcastStatus.RUNNING,), "pause",
                                  unsent=True, status=BroadcastStatus.PAUSED)
    await outbox.hold_broadcast(session, broadcast_id)
    return broadcast


async def resume(session: AsyncSession, broadcast_id: int, now: datetime) -> Broadcast:
    """Release the held rows and carry on queueing. A send job is added only when none is
    waiting or running for this broadcast: a pause/resume storm leaves one job chain."""
    broadcast = await _transition(session, broadcast_id, (BroadcastStatus.PAUSED,), "resume",
                                  status=BroadcastStatus.RUNNING)
    await outbox.resume_broadcast(session, broadcast_id, now)
    alive = await session.scalar(select(Job.id).where(
        Job.kind == SEND_KIND, Job.status.in_((JobStatus.PENDING, JobStatus.RUNNING)),
        Job.payload["broadcast_id"].as_integer() == broadcast_id).limit(1))
    if alive is None:
        session.add(Job(kind=SEND_KIND, due_at=now, created_at=now,
                        payload={"broadcast_id": broadcast_id}))
    return broadcast


async def cancel(session: AsyncSession, broadcast_id: int, now: datetime) -> Broadcast:
    """Stop for good: recipients not queued yet and rows not claimed by a delivery worker
    are skipped (also for a completed broadcast whose rows still wait). A send job in the
    middle of a batch holds the broadcast row, so this waits for it and then skips what it
    queued; after the commit no job queues anything more."""
    broadcast = await _transition(
        session, broadcast_id, BroadcastStatus.stoppable(), "be cancelled",
        unsent=True, status=BroadcastStatus.CANCELLED, finished_at=now)
    await outbox.skip_broadcast(session, broadcast_id, now)
    await session.execute(update(BroadcastRecipient).where(
        BroadcastRecipient.broadcast_id == broadcast_id,
        BroadcastRecipient.status == RecipientStatus.PENDING).values(
        status=RecipientStatus.SKIPPED, reason="cancelled"))
    return broadcast


class SendJob:
    """The ``SEND_KIND`` handler: before each batch's transaction (the write lock held
    meanwhile on SQLite) it waits for answers under way in this process
    (``bot_platform.pressure``): briefly while the workers need rows; while ``AHEAD``
    rows wait and a turn started in the last ``TALKING`` s, up to ``RELAXED_WAIT`` s,
    and then it queues ``RELAXED_BATCH`` recipients, a short transaction for a reply
    to wait for. Why: send jobs queued far ahead of the sending (2,500/s against 1,000/s
    sent) in 500-recipient transactions (100-250 ms each on a busy core), and every
    reply's turn meanwhile waited for one (issue 15)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def prepare(self, job: Job) -> int:
        """The batch to queue (recipients). Nobody talking to this process (a ``botp
        worker``, a quiet bot): full batches at once, five times fewer transactions."""
        pressure = self.engine.pressure
        if not pressure.talking(TALKING) or await self._ahead() < AHEAD:
            await pressure.yield_to_interactive()
            return BATCH
        await pressure.yield_to_interactive(RELAXED_WAIT)
        return min(BATCH, RELAXED_BATCH)

    async def _ahead(self) -> int:
        """Broadcast rows waiting for the workers, counted up to ``AHEAD``."""
        async with self.engine.db.session() as session:
            return await session.scalar(_AHEAD) or 0

    async def apply(self, session: AsyncSession, job: Job, prepared: int | None) -> str:
        return await run_send_job(self.engine, session, job, prepared or BATCH)


_AHEAD = select(func.count()).select_from(select(Outbox.id).where(
    Outbox.status == OutboxStatus.PENDING, Outbox.broadcast_id.is_not(None))
    .limit(AHEAD).subquery())


async def run_send_job(engine: Engine, session: AsyncSession, job: Job,
                       batch: int | None = None) -> str:
    """Queue the next batch (``batch`` or ``BATCH``) of pending recipients (each
    exactly once, ``broadcast_queue``).

    The broadcast row is locked first (``FOR UPDATE`` on PostgreSQL; SQLite runs one
    writer at a time) and its status read under that lock: two send jobs for the same
    broadcast take turns, and a pause or cancel either commits before the batch (which
    then queues nothing) or waits for the batch's commit and then holds or skips it."""
    now = engine.clock.now()
    batch = batch or BATCH
    broadcast_id = job.payload["broadcast_id"]
    found = await broadcast_queue.locked_broadcast(session, broadcast_id)
    if found is None:
        return "gone"
    status, variants, tag = found
    if job.payload.get("start"):
        if status != BroadcastStatus.SCHEDULED:
            return status  # cancelled before its moment
        broadcast = await _transition(session, broadcast_id, (BroadcastStatus.SCHEDULED,), "start",
                                      status=BroadcastStatus.RUNNING, started_at=now)
        targeted = await _snapshot(session, broadcast, now)
        return f"started {targeted}"
    if status != BroadcastStatus.RUNNING:
        return status
    taken = await broadcast_queue.queue_batch(engine, session, broadcast_id, variants, tag,
                                              batch, now)
    if taken == batch:
        await broadcast_queue.next_job(session, broadcast_id, now, now)
        return f"queued {taken}"
    later = await session.scalar(select(func.min(BroadcastRecipient.due_at)).where(
        BroadcastRecipient.broadcast_id == broadcast_id,
        BroadcastRecipient.status == RecipientStatus.PENDING))
    if later is not None:  # local-time recipients whose moment has not come yet
        await broadcast_queue.next_job(session, broadcast_id, later, now)
    else:
        await _transition(session, broadcast_id, (BroadcastStatus.RUNNING,), "complete",
                          status=BroadcastStatus.COMPLETED, finished_at=now)
    return f"queued {taken}"

"""The win-back scan: a daily job that starts flows triggered by inactivity
(``{on: inactive, days: 30}``) for subscribers silent that long.

Each start is recorded as an ``inactive`` event keyed by the subscriber and the time of
their last message, so a quiet subscriber is won back once per silence, however often the
scan runs and however many workers run it.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from bot_platform.database import Database
from bot_platform.events import dispatch
from bot_platform.inbound import Engine
from bot_platform.models import Job, Subscriber
from bot_platform.statuses import JobStatus, SubscriberStatus

log = logging.getLogger(__name__)

SCAN_KIND = "inactivity_scan"
SCAN_EVERY = timedelta(days=1)
SCAN_BATCH = 5000  # subscribers started per run; a full batch runs again a minute later


class InactivityScan:
    """A two-phase job handler: the scan and the flow starts happen before the job's own
    transaction (each start is its own transaction); ``apply`` schedules the next run."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def prepare(self, job: Job) -> dict[str, Any]:
        """Start the flow for up to ``SCAN_BATCH`` quiet subscribers per flow, continuing
        after the last one the previous run of this scan reached (``after`` per flow)."""
        engine, now, started = self.engine, self.engine.clock.now(), 0
        resume: dict[str, int] = dict((job.payload or {}).get("after") or {})
        more: dict[str, int] = {}
        for flow, days in engine.flows.inactivity_triggers():
            async with engine.db.session() as session:
                quiet = (await session.execute(
                    select(Subscriber.id, Subscriber.last_inbound_at).where(
                        Subscriber.status == SubscriberStatus.SUBSCRIBED,
                        Subscriber.last_inbound_at < now - timedelta(days=days),
                        Subscriber.id > resume.get(flow, 0))
                    .order_by(Subscriber.id).limit(SCAN_BATCH))).all()
            for subscriber_id, last_inbound_at in quiet:
                stored, _ = await dispatch(
                    engine, subscriber_id, "inactive", {"days": days}, start_flows=[flow],
                    external_id=f"inactive:{flow}:{subscriber_id}:"
                                f"{last_inbound_at:%Y%m%d%H%M%S}")
                started += stored
            if len(quiet) == SCAN_BATCH:
                more[flow] = quiet[-1].id
        return {"started": started, "after": more}

    async def apply(self, session: AsyncSession, job: Job, prepared: Any) -> str:
        prepared = prepared or {}
        now = self.engine.clock.now()
        if prepared.get("after"):  # a full batch: the rest a minute later, from there on
            await schedule_scan(session, now + timedelta(minutes=1), exclude=job.id,
                                after=prepared["after"])
        else:
            await schedule_scan(session, now + SCAN_EVERY, exclude=job.id)
        return f"started {prepared.get('started', 0)}"


async def schedule_scan(session: AsyncSession, due_at: Any, exclude: int | None = None,
                        after: dict[str, int] | None = None) -> None:
    """Add the next scan unless one is already waiting (several processes may ask);
    ``after`` continues an unfinished scan past those subscribers."""
    waiting = select(Job.id).where(Job.kind == SCAN_KIND,
                                   Job.status.in_((JobStatus.PENDING, JobStatus.RUNNING)))
    if exclude is not None:
        waiting = waiting.where(Job.id != exclude)
    if await session.scalar(waiting.limit(1)) is None:
        session.add(Job(kind=SCAN_KIND, due_at=due_at, created_at=due_at,
                        payload={"after": after} if after else {}))


async def ensure_scan(db: Database, engine: Engine) -> None:
    """At start-up: make sure the scan runs when some flow is triggered by inactivity."""
    if not engine.flows.inactivity_triggers():
        return
    async with db.session() as session:
        await schedule_scan(session, engine.clock.now())

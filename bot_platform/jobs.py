"""The durable scheduler: rows in ``jobs`` with a due time, claimed with a lease.

A job's handler runs in the same transaction that marks the job done, so its effects and
its completion commit together: a crash before the commit leaves the job to be reclaimed
when the lease expires, a crash after it leaves nothing to redo. Handlers are looked up by
``kind`` (flow timers, read fallbacks, broadcasts, the inactivity scan, AI replies): a plain
``JobHandler`` or, when part of the work is a network call, a ``PreparedJobHandler``.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from typing import Any

from sqlalchemy import bindparam, select, true

from bot_platform.clock import Clock
from bot_platform.config import WorkerSettings
from bot_platform.database import Database
from bot_platform.direct import direct
from bot_platform.inbound import Engine
from bot_platform.job_batches import JobBatches
from bot_platform.job_handlers import JobHandler, PreparedJobHandler
from bot_platform.leases import Leases, backoff_delay
from bot_platform.models import Job, Subscriber
from bot_platform.pipeline import Finished, Pipeline
from bot_platform.redaction import redact_secrets
from bot_platform.statement_forms import in_ids
from bot_platform.statuses import JobStatus

log = logging.getLogger(__name__)

Claimed = tuple[int, str, tuple[str, str, str] | None]  # job id, kind, subscriber identity

# The claimed jobs' subscribers, built once (their ids bound at execution).
_SUBSCRIBERS = Subscriber.__table__
_IDENTITIES = select(_SUBSCRIBERS.c.id, _SUBSCRIBERS.c.channel, _SUBSCRIBERS.c.bot_id,
                     _SUBSCRIBERS.c.user_id).where(in_ids(_SUBSCRIBERS.c.id, "b_ids"))


class Scheduler:
    """Claims due jobs and runs their handlers exactly once each."""

    def __init__(self, db: Database, engine: Engine, clock: Clock, settings: WorkerSettings,
                 worker_id: str) -> None:
        self.db = db
        self.engine = engine
        self.clock = clock
        self.settings = settings
        self.worker_id = worker_id
        self.leases = Leases(db, Job, pending=JobStatus.PENDING, busy=JobStatus.RUNNING,
                             clock=clock, lease_seconds=settings.lease_seconds,
                             worker_id=worker_id)
        self.handlers: dict[str, JobHandler | PreparedJobHandler] = {
            "flow_timer": engine.timers.run_flow_timer,
            "read_fallback": engine.timers.run_read_fallback}
        self.batches = JobBatches(self)
        # The claim, built once (its time bound at execution): see ``Leases.claim_statement``.
        # Each arm of ``ready`` is read on its own along ``ix_jobs_due`` (status, due_at,
        # id) up to the limit: with their OR in one WHERE, both databases read and sorted
        # every due job for each claim (100,000 timers due at one instant: ~80 ms of the
        # PostgreSQL server per claim of 200, a full sort on SQLite).
        self._claim = self.leases.claim_statement(
            true(), (Job.due_at, Job.id), (Job.kind, Job.subscriber_id, Job.due_at),
            any_of=self.leases.ready_arms(Job.due_at, bindparam("b_now")))

    async def claim(self, limit: int) -> list[Claimed]:
        """Claim due jobs: (job id, kind, subscriber identity) in due order."""
        async with self.db.session() as session:
            claimed = await self.leases.claim(
                session, None, (), limit, (), statement=self._claim,
                params={"b_now": self.clock.now()})
            subscriber_ids = list({c.subscriber_id for c in claimed if c.subscriber_id})
            identities = {row[0]: (row[1], row[2], row[3]) for row in (
                await (await direct(session)).execute(_IDENTITIES, {"b_ids": subscriber_ids})
            ).rows} if subscriber_ids else {}
        ordered = sorted(claimed, key=lambda c: (c.due_at, c.id))
        return [(c.id, c.kind, identities.get(c.subscriber_id)) for c in ordered]

    async def renew_leases(self) -> int:
        """Extend the lease of every job in hand (``Leases.renew``): a job whose run
        ended without a result (the database was away) is not renewed, so it is claimed
        again once its lease expires."""
        return await self.leases.renew()

    async def run_once(self) -> int:
        """Claim a batch of due jobs and run them; returns how many ran."""
        claimed = await self.claim(self.settings.batch_size)
        await self._run_claimed(claimed, asyncio.Semaphore(self.settings.job_concurrency))
        return len(claimed)

    def pipeline(self) -> Pipeline:
        """Run jobs continuously: a long job (a scan, a slow model) never holds up the
        timers and broadcast batches claimed after it."""
        semaphore = asyncio.Semaphore(self.settings.job_concurrency)

        async def claim(limit: int) -> tuple[int, list[Claimed]]:
            claimed = await self.claim(min(limit, self.settings.batch_size))
            return len(claimed), claimed

        async def handle(claimed: list[Claimed], finished: Finished) -> None:
            await self._run_claimed(claimed, semaphore, finished)

        return Pipeline("scheduler", self.settings.batch_size, claim, handle)

    async def _run_claimed(self, claimed: list[Claimed], semaphore: asyncio.Semaphore,
                           finished: Finished = lambda n: None) -> None:
        """Timers in batches, a transaction for many subscribers (``job_batches``);
        other jobs side by side (``job_concurrency``); one subscriber's in due order, one
        at a time."""
        queues: dict[tuple[str, str, str] | int, list[Claimed]] = {}
        for job_id, kind, identity in claimed:
            queues.setdefault(identity or job_id, []).append((job_id, kind, identity))
        batched = [queue for queue in queues.values() if self.batches.batchable(queue)]
        singles = [queue for queue in queues.values() if not self.batches.batchable(queue)]

        async def run_queue(queue: list[Claimed]) -> None:
            try:
                async with semaphore:
                    for job_id, kind, identity in queue:
                        await self._run_one(job_id, kind, identity)
            finally:
                finished(len(queue))

        await asyncio.gather(self.batches.run(batched, finished),
                             *(run_queue(queue) for queue in singles))

    async def _run_one(self, job_id: int, kind: str,
                       identity: tuple[str, str, str] | None) -> None:
        try:
            handler = self.handlers.get(kind)
            prepared = await self._prepare(job_id) if isinstance(
                handler, PreparedJobHandler) else None
            await self.run_job(job_id, identity, prepared)
        finally:
            self.leases.let_go(job_id)

    async def run_job(self, job_id: int, identity: tuple[str, str, str] | None,
                      prepared: Any = None) -> None:
        try:
            # The subscriber's unit of work: their turns (inbound, timers, other jobs)
            # run one after the other (see bot_platform.turns).
            identities = (identity,) if identity is not None else ()
            async with self.engine.turns.isolated(*identities) as session:
                query = select(Job).where(Job.id == job_id, Job.locked_by == self.worker_id,
                                          Job.status == JobStatus.RUNNING)
                if not self.db.is_sqlite:
                    query = query.with_for_update()
                job = await session.scalar(query)
                if job is None:
                    return  # our lease expired and another worker took it
                handler = self.handlers.get(job.kind)
                if handler is None:
                    raise LookupError(f"no handler for job kind {job.kind!r}")
                if isinstance(handler, PreparedJobHandler):
                    result = await handler.apply(session, job, prepared)
                else:
                    result = await handler(session, job)
                job.status, job.result = JobStatus.DONE, result
                job.finished_at = self.clock.now()
                job.locked_by = job.lease_expires_at = None
            self.engine.on_commit()
        except Exception as error:
            log.exception("job %s failed", job_id)
            await self._failed(job_id, error)

    async def _prepare(self, job_id: int) -> Any:
        """Run a two-phase handler's slow part outside any transaction (and any lock)."""
        try:
            async with self.db.sessions() as session:
                job = await session.get(Job, job_id)
            handler = self.handlers.get(job.kind) if job is not None else None
            if job is None or not isinstance(handler, PreparedJobHandler):
                return None
            return await handler.prepare(job)
        except Exception:
            log.exception("preparing job %s failed; it runs without preparation", job_id)
            return None

    async def _failed(self, job_id: int, error: Exception) -> None:
        async with self.db.session() as session:
            job = await session.get(Job, job_id)
            if job is None or job.locked_by != self.worker_id:
                return
            job.attempts += 1
            job.last_error = redact_secrets(f"{type(error).__name__}: {error}")[:1000]
            job.locked_by = job.lease_expires_at = None
            if job.attempts >= self.settings.max_attempts:
                job.status, job.finished_at = JobStatus.FAILED, self.clock.now()
            else:
                job.status = JobStatus.PENDING
                job.due_at = self.clock.now() + timedelta(seconds=backoff_delay(
                    job.attempts, self.settings.backoff_base, self.settings.backoff_max))

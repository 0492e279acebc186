"""Due timers fired in batches: many subscribers' jobs in one transaction.

A job on its own costs a transaction, an advisory lock, a fenced ``SELECT``, four
statements to load the turn and a commit: about 3 ms before any flow work. A wave of
timers (everyone who joined from one campaign, due at one instant) is fired here in
transactions of ``BATCH_JOBS`` jobs instead:

* the subscribers' in-process locks, then the transaction, then their advisory locks (one
  statement), all in a stable order (``turn_batches.isolated_many``);
* the fence: only the jobs still ``running`` under this worker's id are read (``FOR
  UPDATE`` on PostgreSQL, so nobody takes them over until we commit or our session dies);
  a job another worker took over after our lease lapsed is left to it;
* the turns loaded together (``turn_batches.preload``);
* each job's handler in a SAVEPOINT: a failing turn rolls back only itself and is
  recorded as a failure (retry with backoff) after the batch commits; a flow timer's turn
  is kept, not saved, and all kept turns are written together at the end
  (``turn_batches.save_many``), with the jobs' ``done`` marks (one ``executemany``);
* one commit for all; right before it, every job must still be surely ours by its lease
  deadline (``Leases.owns``), else the batch is rolled back and each job runs on its own.

A batch that fails as a whole (the database went away, a deadlock victim) is rolled back
and its jobs run one by one through the single-job path, which fences and records
failures itself. Batches of one worker run one after the other in claim order, so a
subscriber's timers fire in due order; the jobs of one subscriber in a batch run in due
order inside it.

Only plain handlers of the kinds in ``BATCHED_KINDS`` (flow timers, read fallbacks) are
batched; a subscriber whose claimed jobs include another kind (an AI answer with its slow
preparation, a scan) has all of them run on the single-job path, in order.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from sqlalchemy import bindparam, select, update

from bot_platform.models import Job
from bot_platform.statuses import JobStatus
from bot_platform.turn_batches import (
    drop_deferred,
    forget_preloaded,
    isolated_many,
    preload,
    save_many,
    start_deferring,
    take_deferred,
)

if TYPE_CHECKING:
    from bot_platform.jobs import Claimed, Scheduler
    from bot_platform.pipeline import Finished

log = logging.getLogger(__name__)

BATCHED_KINDS = frozenset({"flow_timer", "read_fallback"})
# Jobs per transaction: enough to spread the fixed costs thin, few enough that the write
# lock (SQLite) and the subscribers' locks are held only briefly.
BATCH_JOBS = 50

_JOBS = Job.__table__
_DONE = update(_JOBS).where(_JOBS.c.id == bindparam("job_id")).values(
    status=JobStatus.DONE, result=bindparam("result"), locked_by=None,
    lease_expires_at=None)


class LeaseLapsed(Exception):
    """A job of the batch is no longer surely ours: its results must not be applied."""


class JobBatches:
    """Runs one worker's batchable jobs a transaction per batch, batches in claim order."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.order = asyncio.Lock()  # FIFO: a claim's batches before the next claim's

    def batchable(self, queue: list[Claimed]) -> bool:
        """Whether a subscriber's claimed jobs may all run in a batch."""
        handlers = self.scheduler.handlers
        return queue[0][2] is not None and all(
            kind in BATCHED_KINDS and kind in handlers
            and not hasattr(handlers[kind], "prepare") for _, kind, _ in queue)

    async def run(self, queues: list[list[Claimed]],
                  finished: Finished | None = None) -> None:
        """Run subscribers' job queues (each in due order) in batches of about
        ``BATCH_JOBS`` jobs; ``finished(n)`` as each batch ends."""
        async with self.order:
            batch: list[list[Claimed]] = []
            size = 0
            for queue in queues:
                batch.append(queue)
                size += len(queue)
                if size >= BATCH_JOBS:
                    await self._run_batch(batch, finished)
                    batch, size = [], 0
            if batch:
                await self._run_batch(batch, finished)

    async def _run_batch(self, queues: list[list[Claimed]],
                         finished: Finished | None) -> None:
        scheduler = self.scheduler
        claimed = [claim for queue in queues for claim in queue]
        try:
            try:
                failed = await self._transaction(queues)
            except Exception:
                log.exception("a batch of %d jobs failed as a whole; running them one by "
                              "one", len(claimed))
                for job_id, _, identity in claimed:
                    await scheduler.run_job(job_id, identity)
                return
            scheduler.engine.on_commit()
            for job_id, error in failed:
                await scheduler._failed(job_id, error)
        finally:
            for job_id, _, _ in claimed:
                scheduler.leases.let_go(job_id)
            if finished is not None:
                finished(len(claimed))

    async def _transaction(self, queues: list[list[Claimed]]) -> list[tuple[int, Exception]]:
        """The batch's one transaction; returns the jobs whose turns failed (rolled back
        to their savepoints, to be recorded after the commit)."""
        scheduler = self.scheduler
        identities = [queue[0][2] for queue in queues if queue[0][2] is not None]
        failed: list[tuple[int, Exception]] = []
        async with isolated_many(scheduler.engine.turns, identities) as session:
            ids = [job_id for queue in queues for job_id, _, _ in queue]
            query = select(Job).where(Job.id.in_(ids), Job.locked_by == scheduler.worker_id,
                                      Job.status == JobStatus.RUNNING)
            if not scheduler.db.is_sqlite:
                query = query.with_for_update()
            jobs = {job.id: job for job in (await session.scalars(query)).all()}
            firsts = [jobs[queue[0][0]] for queue in queues if queue[0][0] in jobs]
            turns = scheduler.engine.turns
            await preload(turns, session, [
                job.subscriber_id for job in firsts
                if job.kind == "flow_timer" and job.subscriber_id is not None])
            start_deferring(session)
            results: list[dict[str, Any]] = []
            for job_id in ids:
                job = jobs.get(job_id)
                if job is None:
                    continue  # our lease expired and another worker took it
                subscriber_id = job.subscriber_id  # a failed savepoint may expire the job
                earlier = take_deferred(session, subscriber_id)
                if earlier is not None:  # this subscriber's previous turn, before this one
                    await earlier.save()
                try:
                    async with session.begin_nested():
                        result = await scheduler.handlers[job.kind](session, job)
                    results.append({"job_id": job_id, "result": result})
                except Exception as error:
                    log.exception("job %s failed", job_id)
                    failed.append((job_id, error))
                    drop_deferred(session, subscriber_id)
                finally:
                    forget_preloaded(session, subscriber_id)
            await save_many(turns, session)
            if results:
                await session.execute(_DONE.values(finished_at=scheduler.clock.now()),
                                      results)
            lapsed = [job_id for job_id in jobs if not scheduler.leases.owns(job_id)]
            if lapsed:
                raise LeaseLapsed(f"leases of jobs {lapsed} lapsed in hand")
        return failed

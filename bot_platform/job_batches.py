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
* the handlers one after the other; a flow timer's turn is kept, not saved, and all
  kept turns are written together at the end (``turn_batches.save_many``), with the
  jobs' ``done`` marks (one ``executemany``);
* a failing turn rolls back only itself: the batch's transaction is rolled back and the
  batch runs again without it (no SAVEPOINT round trips per job in the common case where
  nothing fails); the failed job is recorded (retry with backoff) once the rest commits,
  and after ``RETRIES`` failing turns the batch's jobs run one by one;
* one commit for all; right before it, every job must still be surely ours by its lease
  deadline (``Leases.owns``), else the batch is rolled back and each job runs on its own.

A batch that fails as a whole (the database went away, a deadlock victim) is rolled back
and its jobs run one by one through the single-job path, which fences and records
failures itself. A claim's batches share no subscriber; on PostgreSQL up to ``IN_FLIGHT``
of them run side by side (a batch waits on round trips most of its time), and the next
claim's batches start once they all ended, so a subscriber's timers fire in due order;
the jobs of one subscriber in a batch run in due order inside it.

Only plain handlers of the kinds in ``BATCHED_KINDS`` (flow timers, read fallbacks) are
batched; a subscriber whose claimed jobs include another kind (an AI answer with its slow
preparation, a scan) has all of them run on the single-job path, in order.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import bindparam, select, update

from bot_platform.direct import direct
from bot_platform.job_handlers import PreparedJobHandler
from bot_platform.models import Job
from bot_platform.statement_forms import in_ids
from bot_platform.statuses import JobStatus
from bot_platform.turn_batches import (
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
BATCH_JOBS = 100
# Batches of one claim run side by side on PostgreSQL (see ``JobBatches.run``).
IN_FLIGHT = 4
# Failing turns a batch is retried without before its jobs run one by one instead.
RETRIES = 3

_JOBS = Job.__table__
# The fence: the batch's jobs still leased to this worker, locked until the commit on
# PostgreSQL (SQLite renders no ``FOR UPDATE``: its transaction holds the write lock).
_FENCE = select(_JOBS.c.id, _JOBS.c.kind, _JOBS.c.subscriber_id, _JOBS.c.flow,
                _JOBS.c.payload).where(
    in_ids(_JOBS.c.id, "b_ids"), _JOBS.c.locked_by == bindparam("b_worker"),
    _JOBS.c.status == JobStatus.RUNNING).with_for_update()
_DONE = update(_JOBS).where(_JOBS.c.id == bindparam("job_id")).values(
    status=JobStatus.DONE, result=bindparam("result"), locked_by=None,
    lease_expires_at=None, finished_at=bindparam("finished_at"))


@dataclass(slots=True)
class JobRow:
    """A fenced job as the batched handlers read it (the ``Job`` columns they use)."""

    id: int
    kind: str
    subscriber_id: int | None
    flow: str | None
    payload: dict[str, Any]


class LeaseLapsed(Exception):
    """A job of the batch is no longer surely ours: its results must not be applied."""


class JobBatches:
    """Runs one worker's batchable jobs a transaction per batch, batches in claim order."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.order = asyncio.Lock()  # FIFO: a claim's batches before the next claim's
        self._plain_handlers: dict[int, tuple[Any, bool]] = {}  # id -> (handler, plain)

    def batchable(self, queue: list[Claimed]) -> bool:
        """Whether a subscriber's claimed jobs may all run in a batch."""
        return queue[0][2] is not None and all(self._plain(kind) for _, kind, _ in queue)

    def _plain(self, kind: str) -> bool:
        """A batched kind whose handler is a plain one. The ``isinstance`` check against
        a runtime protocol costs ~40 us, so its answer is kept per handler (tests swap
        handlers: the key is the handler object)."""
        handler = self.scheduler.handlers.get(kind) if kind in BATCHED_KINDS else None
        if handler is None:
            return False
        known = self._plain_handlers.get(id(handler))
        if known is None or known[0] is not handler:
            known = self._plain_handlers[id(handler)] = (
                handler, not isinstance(handler, PreparedJobHandler))
        return known[1]

    async def run(self, queues: list[list[Claimed]],
                  finished: Finished | None = None) -> None:
        """Run subscribers' job queues (each in due order) in batches of about
        ``BATCH_JOBS`` jobs; ``finished(n)`` as each batch ends. On PostgreSQL up to
        ``IN_FLIGHT`` batches of one claim run side by side (each on its own connection,
        so one batch's round trips overlap another's): a claim holds a subscriber's jobs
        in one queue, so its batches share no subscriber; the next claim's batches wait
        for all of them (``order``), which keeps a subscriber's timers in due order."""
        batches: list[list[list[Claimed]]] = [[]]
        size = 0
        for queue in queues:
            if size >= BATCH_JOBS:
                batches.append([])
                size = 0
            batches[-1].append(queue)
            size += len(queue)
        batches = [batch for batch in batches if batch]
        in_flight = 1 if self.scheduler.db.is_sqlite else IN_FLIGHT  # one writer anyway
        async with self.order:
            for start in range(0, len(batches), in_flight):
                await asyncio.gather(*(self._run_batch(batch, finished)
                                       for batch in batches[start:start + in_flight]))

    async def _run_batch(self, queues: list[list[Claimed]],
                         finished: Finished | None) -> None:
        scheduler = self.scheduler
        claimed = [claim for queue in queues for claim in queue]
        failed: list[tuple[int, Exception]] = []
        try:
            try:
                while True:
                    try:
                        await self._transaction(queues, {job_id for job_id, _ in failed})
                        break
                    except _TurnFailed as turn:  # again, without it
                        failed.append((turn.job_id, turn.error))
                        if len(failed) > RETRIES:
                            raise
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

    async def _transaction(self, queues: list[list[Claimed]], left_out: set[int]) -> None:
        """The batch's one transaction, without the jobs ``left_out``. A failing turn
        raises ``_TurnFailed``: the transaction is rolled back and the batch retried
        without it."""
        scheduler = self.scheduler
        identities = [queue[0][2] for queue in queues if queue[0][2] is not None]
        async with isolated_many(scheduler.engine.turns, identities) as session:
            ids = [job_id for queue in queues for job_id, _, _ in queue
                   if job_id not in left_out]
            fenced = await (await direct(session)).execute(
                _FENCE, {"b_ids": ids, "b_worker": scheduler.worker_id})
            jobs = {row[0]: JobRow(*row) for row in fenced.rows}
            firsts: dict[int, JobRow] = {}
            for job_id in ids:
                job = jobs.get(job_id)
                if job is not None and job.subscriber_id is not None:
                    firsts.setdefault(job.subscriber_id, job)
            turns = scheduler.engine.turns
            await preload(turns, session, [subscriber_id for subscriber_id, job
                                           in firsts.items() if job.kind == "flow_timer"])
            start_deferring(session)
            results: list[dict[str, Any]] = []
            for job_id in ids:
                job = jobs.get(job_id)
                if job is None:
                    continue  # our lease expired and another worker took it
                earlier = take_deferred(session, job.subscriber_id)
                if earlier is not None:  # this subscriber's previous turn, before this one
                    await earlier.save()
                try:
                    result = await scheduler.handlers[job.kind](session, job)
                except Exception as error:
                    log.exception("job %s failed; its batch goes again without it", job_id)
                    raise _TurnFailed(job_id, error) from error
                forget_preloaded(session, job.subscriber_id)
                results.append({"job_id": job_id, "result": result})
            if results:  # deferred: they go with the turns' writes (save_many)
                now = scheduler.clock.now()
                connection = await direct(session)
                with connection.deferring():
                    await connection.write(_DONE, [
                        {**result, "finished_at": now} for result in results])
            await save_many(turns, session)
            lapsed = [job_id for job_id in jobs if not scheduler.leases.owns(job_id)]
            if lapsed:
                raise LeaseLapsed(f"leases of jobs {lapsed} lapsed in hand")


class _TurnFailed(Exception):
    """A job's turn failed inside a batch: the batch is rolled back and retried
    without it; the job is recorded as failed (retried later) once the batch commits."""

    def __init__(self, job_id: int, error: Exception) -> None:
        super().__init__(job_id, error)
        self.job_id, self.error = job_id, error

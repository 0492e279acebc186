"""Scheduler benchmark: N welcome-chain timers due at the same instant, fired by real
``botp worker`` processes. Prints the time until all fired, fired/s and the lateness
(``finished_at - due_at``) p50/p99/max, the messages the fired timers queued and the
workers delivered to the relay fake, and each worker's peak RSS.

The population is what N customers who sent /start a day ago leave behind: a subscriber in
state ``greeting`` of flow ``welcome`` with its 1-day ``flow_timer`` pending. One customer
goes through ``Engine.handle`` first; the other N-1 are bulk-inserted as copies of its rows
(contacts, subscribers, subscriber_tags, flow_states, jobs), so they are exactly what the
engine writes, without paying N inbound events to set up. The timers are inserted not yet
due; once the workers are up and idle one UPDATE makes them all due at the same instant.

Same-run baselines, on the same worker processes and database:
  * no-op jobs/s: ``read_fallback`` jobs whose message is gone, the cheapest real handler
    (two primary-key reads, result "gone"): the scheduler's own cost per job (claim,
    per-subscriber locks, the job's transaction), so the table shows what the flow work
    (load the turn, fire, save it, queue the message) costs on top;
  * raw claims/s: ``UPDATE jobs SET status='done' ... RETURNING`` in batches of the
    worker's batch size from this process, workers stopped: the database's floor.

Configurations: SQLite with one worker; PostgreSQL (fresh database) with 1 and 3 workers
(``--workers``), sharing a Redis (``BOTP_REDIS_URL``, db 13 by default, flushed first).
Where the server runs with autovacuum off, the bench ANALYZEs changed tables as autovacuum
would (``--analyze-every``), so query plans follow the data as in production.
A configuration still firing after ``--deadline`` seconds is stopped; its row is marked
``*`` and the time to fire all N and the lateness percentiles are projected from the rate
so far (claims go in due order, so the k-th timer fires about k / rate after the instant).

    .venv/bin/python bench/scheduler.py [--timers 100000] [--workers 1,3] [--deadline 60]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import func, insert, select, text, update  # noqa: E402
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine  # noqa: E402

from bench.harness import drop_postgres, postgres_database, write_report  # noqa: E402
from bot_platform.clock import SystemClock  # noqa: E402
from bot_platform.config import BotConfig, Settings, WorkerSettings  # noqa: E402
from bot_platform.database import Database  # noqa: E402
from bot_platform.models import (  # noqa: E402
    Contact,
    FlowState,
    Job,
    Subscriber,
    SubscriberTag,
)
from bot_platform.platform import Platform  # noqa: E402
from tests.fakes.relay import FakeRelayServer  # noqa: E402

REDIS_URL = os.environ.get("BOTP_BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")
CHUNK = 5000  # rows per executemany
NOT_YET = timedelta(days=30)  # where timers wait until the workers are ready
BATCH = WorkerSettings().batch_size  # the worker's claim batch (the default setting)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile by rank (as bench/engine.py computes it); NaN for none."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


# ---- worker processes -------------------------------------------------------------------


def worker_env(url: str, relay_url: str, redis_url: str | None) -> dict[str, str]:
    """The environment of a ``botp worker``: the console bot talks to the relay fake."""
    bots = [{"id": "console", "channel": "console", "api_base": relay_url}]
    env = {**os.environ, "BOTP_DATABASE_URL": url, "BOTP_FLOWS_DIR": str(ROOT / "flows"),
           "BOTP_LOCALES_DIR": str(ROOT / "locales"), "BOTP_BOTS": json.dumps(bots),
           "BOTP_LOG_LEVEL": "WARNING"}
    if redis_url:
        env["BOTP_REDIS_URL"] = redis_url
    else:
        env.pop("BOTP_REDIS_URL", None)
    return env


def botp_command() -> list[str]:
    """``botp`` from this interpreter's environment (``python -m`` when not installed)."""
    script = Path(sys.executable).parent / "botp"
    return [str(script)] if script.exists() else [sys.executable, "-m", "bot_platform.cli"]


def proc_status(pid: int, field_name: str) -> int:
    """A ``kB`` field of /proc/<pid>/status (VmRSS, VmHWM) in bytes; 0 when gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Workers:
    """N ``botp worker`` processes; always stopped (SIGTERM, then SIGKILL) by ``stop``."""

    def __init__(self, count: int, env: dict[str, str], log_dir: Path) -> None:
        self.count, self.env, self.log_dir = count, env, log_dir
        self.processes: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []

    def start(self) -> None:
        for n in range(self.count):
            log = self.log_dir / f"worker-{uuid.uuid4().hex[:6]}-{n}.log"
            self.logs.append(log)
            with log.open("wb") as stderr:
                self.processes.append(subprocess.Popen(
                    [*botp_command(), "worker"], cwd=ROOT, env=self.env,
                    stdout=subprocess.DEVNULL, stderr=stderr))

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def check_alive(self) -> None:
        for process, log in zip(self.processes, self.logs, strict=True):
            if process.poll() is not None:
                tail = log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"worker {process.pid} exited with {process.returncode}:\n"
                                   f"{tail}")

    def cpu(self) -> list[float]:
        return [cpu_seconds(pid) for pid in self.pids]

    def peak_rss_mb(self) -> list[float]:
        return [proc_status(pid, "VmHWM") / 2**20 for pid in self.pids]

    def errors(self) -> int:
        """Lines of ERROR (tracebacks) the workers logged."""
        return sum(log.read_text(errors="replace").count(" ERROR ") for log in self.logs
                   if log.exists())

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 25  # the worker's shutdown grace is 15 s
        for process in self.processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


async def wait_idle(workers: Workers, limit: float = 60.0) -> float:
    """Wait until every worker has started and sits polling (little CPU for a second);
    returns how long that took."""
    started = time.monotonic()
    await asyncio.sleep(1.0)
    quiet_since: float | None = None
    before = workers.cpu()
    while time.monotonic() - started < limit:
        await asyncio.sleep(0.5)
        workers.check_alive()
        after = workers.cpu()
        busy = max(b - a for a, b in zip(before, after, strict=True))
        before = after
        if busy < 0.1:
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since >= 1.0:
                return time.monotonic() - started
        else:
            quiet_since = None
    print(f"  workers still busy after {limit:.0f} s (a loaded machine?): going on",
          file=sys.stderr)
    return time.monotonic() - started


# ---- PostgreSQL statistics -------------------------------------------------------------


@contextlib.asynccontextmanager
async def autoanalyze(url: str, every: float) -> AsyncIterator[dict[str, Any]]:
    """While inside: if the server runs with autovacuum off (this machine's does), ANALYZE
    every table past autovacuum's threshold (50 rows + 10% changed) every ``every`` s, as
    a production server would; otherwise planners keep the statistics of empty tables (an
    outbox that filled up is then claimed by sorting all of it). Yields what it did."""
    import asyncpg

    done: dict[str, Any] = {"autovacuum": None, "analyzed": 0}
    if not url.startswith("postgresql") or every <= 0:
        yield done
        return
    connection = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    done["autovacuum"] = await connection.fetchval("SHOW autovacuum")

    async def loop() -> None:
        while True:
            await asyncio.sleep(every)
            stale = await connection.fetch(
                "SELECT relname FROM pg_stat_user_tables "
                "WHERE n_mod_since_analyze > 50 + 0.1 * greatest(n_live_tup, 0)")
            for row in stale:
                await connection.execute(f'ANALYZE "{row["relname"]}"')
                done["analyzed"] += 1

    task = asyncio.create_task(loop()) if done["autovacuum"] == "off" else None
    try:
        yield done
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await connection.close()


# ---- the population -------------------------------------------------------------------


def columns(row: Any) -> dict[str, Any]:
    """A mapped row as the dict an ``insert(...)`` takes, column for column."""
    return {name: getattr(row, name) for name in row.__table__.columns.keys()}


async def reference_rows(url: str, relay_url: str) -> dict[str, Any]:
    """One customer sends /start through ``Engine.handle``: the rows it leaves are the
    pattern the bulk-inserted population copies."""
    settings = Settings(_env_file=None, database_url=url, flows_dir=ROOT / "flows",
                        locales_dir=ROOT / "locales",
                        bots=[BotConfig(id="console", channel="console", api_base=relay_url)])
    platform = Platform(settings, clock=SystemClock())
    await platform.start()
    try:
        console = platform.channel("console", "console")
        await platform.engine.handle(console.inbound("bench-0", "/start"))
        async with platform.db.session() as session:
            subscriber = await session.scalar(select(Subscriber))
            rows = {
                "contact": columns(await session.get(Contact, subscriber.contact_id)),
                "subscriber": columns(subscriber),
                "tags": [columns(t) for t in (await session.scalars(select(SubscriberTag)))],
                "flow_state": columns(await session.scalar(select(FlowState))),
                "job": columns(await session.scalar(select(Job).where(
                    Job.kind == "flow_timer"))),
            }
    finally:
        await platform.close()
    job, state = rows["job"], rows["flow_state"]
    assert job["payload"] == {"state": state["state"], "version": state["version"]}, rows
    assert (state["flow"], state["state"], state["status"]) == ("welcome", "greeting",
                                                                "active"), state
    assert job["status"] == "pending" and job["due_at"] - state["updated_at"] == timedelta(
        days=1), job
    return rows


def _copy(template: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A reference row with other ids and times (no id unless given: autoincrement)."""
    row = {name: value for name, value in template.items() if name != "id"}
    row.update(changes)
    return row


async def load_population(db: Database, reference: dict[str, Any], count: int) -> None:
    """Copies of the reference customer (ids 2..count), subscribed a day ago, their
    timers not yet due; the reference's own timer joins them."""
    subscribed = datetime.now(UTC) - timedelta(days=1)
    later = subscribed + NOT_YET
    contact, subscriber = reference["contact"], reference["subscriber"]
    state, job = reference["flow_state"], reference["job"]
    assert subscriber["id"] == contact["id"] == 1, "the reference must be the first customer"
    first_id = 2
    async with db.session() as session:
        await session.execute(update(Job).where(Job.id == job["id"]).values(due_at=later))
        for start in range(first_id, count + 1, CHUNK):
            ids = range(start, min(count + 1, start + CHUNK))
            await session.execute(insert(Contact), [
                _copy(contact, id=i, created_at=subscribed) for i in ids])
            await session.execute(insert(Subscriber), [
                _copy(subscriber, id=i, contact_id=i, user_id=f"bench-{i}",
                      created_at=subscribed, updated_at=subscribed,
                      last_inbound_at=subscribed) for i in ids])
            await session.execute(insert(SubscriberTag), [
                _copy(tag, subscriber_id=i) for i in ids for tag in reference["tags"]])
            await session.execute(insert(FlowState), [
                _copy(state, id=i, subscriber_id=i, created_at=subscribed,
                      updated_at=subscribed) for i in ids])
            await session.execute(insert(Job), [
                _copy(job, subscriber_id=i, created_at=subscribed, due_at=later)
                for i in ids])
        if not db.is_sqlite:
            for table in ("contacts", "subscribers", "flow_states"):
                await session.execute(text(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                    f"(SELECT max(id) FROM {table}))"))
    if not db.is_sqlite:  # what autovacuum would have done after such a load
        async with db.engine.connect() as connection:
            await connection.execution_options(isolation_level="AUTOCOMMIT")
            await connection.execute(text("VACUUM ANALYZE"))


async def add_noop_jobs(db: Database, count: int) -> None:
    """``read_fallback`` jobs pointing at no message: the handler reads two rows by
    primary key and answers "gone"."""
    later = datetime.now(UTC) + NOT_YET
    async with db.session() as session:
        for start in range(0, count, CHUNK):
            await session.execute(insert(Job), [
                {"kind": "read_fallback", "subscriber_id": 1 + (n % count), "flow": "welcome",
                 "payload": {"outbox_id": 0, "channel": None, "message": {"text": "-"}},
                 "due_at": later, "status": "pending", "attempts": 0, "created_at": later}
                for n in range(start, min(count, start + CHUNK))])


@dataclass(frozen=True)
class Batch:
    """The jobs made due together: their kind, the instant, and the last id among them
    (jobs they create later, such as the next timer of the chain, have larger ids)."""

    kind: str
    instant: datetime
    last_id: int

    def where(self) -> Any:
        return (Job.kind == self.kind) & (Job.id <= self.last_id)


async def make_due(db: Database, kind: str, lead: float = 1.0) -> Batch:
    """Every pending job of ``kind`` becomes due at one instant, ``lead`` s from now (so
    the UPDATE has committed before it comes)."""
    instant = datetime.now(UTC) + timedelta(seconds=lead)
    async with db.session() as session:
        last_id = await session.scalar(select(func.max(Job.id)))
        await session.execute(update(Job).where(Job.kind == kind, Job.status == "pending")
                              .values(due_at=instant))
    return Batch(kind, instant, last_id or 0)


async def cancel_left(db: Database, batch: Batch) -> None:
    """Cancel a batch's jobs still pending (a baseline cut short by its time limit)."""
    async with db.session() as session:
        await session.execute(update(Job).where(batch.where(), Job.status == "pending")
                              .values(status="cancelled", result="bench-cut"))


@dataclass
class Progress:
    """Jobs of a batch finished (by result) and left, and when the last one finished."""

    done: int = 0
    left: int = 0
    results: dict[str, int] = field(default_factory=dict)
    last_finished: datetime | None = None

    def seconds(self, batch: Batch) -> float:
        """From the due instant to the last job finished."""
        if self.last_finished is None:
            return 0.0
        return (self.last_finished - batch.instant).total_seconds()


async def progress(reader: AsyncEngine, batch: Batch) -> Progress:
    """How far the batch is, read without taking SQLite's write lock from the workers."""
    async with reader.connect() as connection:
        rows = (await connection.execute(
            select(Job.status, Job.result, func.count()).where(batch.where())
            .group_by(Job.status, Job.result))).all()
        last = await connection.scalar(select(func.max(Job.finished_at)).where(
            batch.where(), Job.status == "done"))
    state = Progress(last_finished=last)
    for status, result, count in rows:
        if status in ("pending", "running"):
            state.left += count
        else:
            state.done += count
            key = result if status == "done" else status
            state.results[key] = state.results.get(key, 0) + count
    return state


async def wait_done(reader: AsyncEngine, workers: Workers, batch: Batch, limit: float,
                    label: str) -> tuple[Progress, float]:
    """Poll until no job of the batch is pending or running, or ``limit`` seconds after
    its instant; returns the last progress and the seconds since the instant."""
    last_print = 0.0
    while True:
        await asyncio.sleep(0.5)
        workers.check_alive()
        state = await progress(reader, batch)
        elapsed = (datetime.now(UTC) - batch.instant).total_seconds()
        if time.monotonic() - last_print > 15:
            last_print = time.monotonic()
            print(f"  {label}: {state.done} done, {state.left} left after {elapsed:.0f} s",
                  file=sys.stderr)
        if state.left == 0 or elapsed > limit:
            return state, elapsed


async def lateness(reader: AsyncEngine, batch: Batch) -> list[float]:
    """``finished_at - due_at`` in seconds of every fired job of the batch."""
    async with reader.connect() as connection:
        rows = (await connection.execute(select(Job.due_at, Job.finished_at).where(
            batch.where(), Job.status == "done", Job.result == "fired"))).all()
    return [(finished - due).total_seconds() for due, finished in rows]


async def raw_claims(db: Database, count: int) -> float:
    """The database's floor: claim-and-finish ``count`` trivial jobs in batches of the
    worker's batch size, one statement each, as the scheduler's claim is written."""
    now = datetime.now(UTC)
    async with db.session() as session:
        for start in range(0, count, CHUNK):
            await session.execute(insert(Job), [
                {"kind": "bench_raw", "payload": {}, "due_at": now, "status": "pending",
                 "attempts": 0, "created_at": now}
                for _ in range(start, min(count, start + CHUNK))])
    claimed, started = 0, time.perf_counter()
    while claimed < count:
        moment = datetime.now(UTC)
        ids = (select(Job.id).where(Job.status == "pending", Job.kind == "bench_raw",
                                    Job.due_at <= moment)
               .order_by(Job.due_at, Job.id).limit(BATCH))
        if not db.is_sqlite:
            ids = ids.with_for_update(skip_locked=True)
        async with db.session() as session:
            rows = (await session.execute(
                update(Job).where(Job.id.in_(ids.scalar_subquery()))
                .values(status="done", result="raw", finished_at=moment)
                .returning(Job.id).execution_options(synchronize_session=False))).all()
        if not rows:
            break
        claimed += len(rows)
    return claimed / (time.perf_counter() - started)


# ---- one configuration --------------------------------------------------------------------


async def run(name: str, url: str, workers_count: int, args: argparse.Namespace,
              redis_url: str | None, log_dir: Path) -> dict[str, Any]:
    """One configuration on a fresh database: load, baseline, timers, raw claims."""
    from bot_platform.migrations import upgrade

    print(f"{name} x{workers_count}: loading {args.timers} customers", file=sys.stderr)
    await asyncio.to_thread(upgrade, url)
    relay = await FakeRelayServer().start()
    db = Database(url)
    reader = create_async_engine(url)
    workers = Workers(workers_count, worker_env(url, relay.url, redis_url), log_dir)
    try:
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(relay.close)
            stack.callback(workers.stop)  # on any way out: SIGTERM, then SIGKILL
            started = time.perf_counter()
            reference = await reference_rows(url, relay.url)
            await load_population(db, reference, args.timers)
            noop_count = min(args.timers, args.baseline_jobs)
            await add_noop_jobs(db, noop_count)
            load_seconds = time.perf_counter() - started

            analyzing = await stack.enter_async_context(autoanalyze(url, args.analyze_every))
            workers.start()
            startup = await wait_idle(workers)
            # Baseline first: the same processes, already warm, with nothing else due.
            noop_batch = await make_due(db, "read_fallback")
            noop, _ = await wait_done(reader, workers, noop_batch, args.baseline_seconds,
                                      "no-op jobs")
            noop_seconds = noop.seconds(noop_batch)
            await cancel_left(db, noop_batch)  # so they do not run ahead of the timers
            await wait_idle(workers)
            delivered_before = len(relay.received)
            cpu_before = workers.cpu()
            timers = await make_due(db, "flow_timer")
            state, seconds = await wait_done(reader, workers, timers, args.deadline, "timers")
            cpu = [b - a for a, b in zip(cpu_before, workers.cpu(), strict=True)]
            delivered = len(relay.received) - delivered_before
            peak_rss = workers.peak_rss_mb()
            errors = workers.errors()
        late = await lateness(reader, timers)
        async with reader.connect() as connection:
            outbox_left = await connection.scalar(text(
                "SELECT count(*) FROM outbox WHERE status IN ('pending', 'sending')"))
        raw_rate = await raw_claims(db, min(args.timers, args.baseline_jobs))
    finally:
        await reader.dispose()
        await db.close()

    fired = state.results.get("fired", 0)
    complete = state.left == 0
    if complete:
        seconds = state.seconds(timers)
    rate = fired / seconds if seconds > 0 else 0.0
    if complete:
        all_seconds = max(late) if late else seconds
        p50, p99, worst = (statistics.median(late), percentile(late, 0.99),
                           max(late, default=float("nan")))
    else:  # projected: the k-th timer (in due order) fires about k / rate after the instant
        all_seconds = args.timers / rate if rate else float("inf")
        p50, p99, worst = (0.5 * all_seconds, 0.99 * all_seconds, all_seconds)
    return {
        "backend": name, "workers": workers_count, "timers": args.timers,
        "complete": complete, "fired": fired, "results": state.results,
        "left": state.left, "seconds": seconds, "all_fired_seconds": all_seconds,
        "fired_per_s": rate, "lateness_p50_s": p50, "lateness_p99_s": p99,
        "lateness_max_s": worst,
        "lateness_fired_so_far": None if complete else {
            "p50_s": statistics.median(late) if late else None,
            "p99_s": percentile(late, 0.99), "max_s": max(late, default=None)},
        "delivered": delivered, "outbox_left": outbox_left,
        "noop_jobs": noop.done, "noop_seconds": noop_seconds,
        "noop_per_s": noop.done / noop_seconds if noop_seconds else 0.0,
        "raw_claims_per_s": raw_rate, "worker_peak_rss_mb": peak_rss,
        "worker_cpu_percent": [100 * c / seconds for c in cpu] if seconds else [],
        "worker_errors_logged": errors, "load_seconds": load_seconds,
        "worker_startup_seconds": startup, "redis": redis_url,
        "autovacuum": analyzing["autovacuum"], "bench_analyzes": analyzing["analyzed"],
    }


def flush_redis(url: str) -> str | None:
    """The bench's own Redis database, emptied; None when Redis is not reachable."""
    try:
        import redis

        client = redis.Redis.from_url(url, socket_timeout=3)
        client.flushdb()
        client.close()
    except Exception as error:
        print(f"Redis not reachable ({type(error).__name__}): PostgreSQL runs without it",
              file=sys.stderr)
        return None
    return url


async def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timers", type=int, default=100_000)
    parser.add_argument("--workers", default="1,3",
                        help="worker processes per PostgreSQL run, comma-separated")
    parser.add_argument("--deadline", type=float, default=60.0,
                        help="seconds a configuration may fire before it is stopped and "
                             "projected")
    parser.add_argument("--baseline-jobs", type=int, default=5000)
    parser.add_argument("--baseline-seconds", type=float, default=20.0)
    parser.add_argument("--analyze-every", type=float, default=20.0,
                        help="on a server with autovacuum off, ANALYZE changed tables this "
                             "often (s) as autovacuum would (0: never)")
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--no-sqlite", action="store_true")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "scheduler.json"))
    args = parser.parse_args()

    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    results = []
    with tempfile.TemporaryDirectory() as folder:
        log_dir = Path(folder)
        if not args.no_sqlite:
            results.append(await run("sqlite", f"sqlite+aiosqlite:///{folder}/s.sqlite3", 1,
                                     args, None, log_dir))
        if not args.no_postgres:
            for count in (int(n) for n in args.workers.split(",") if n.strip()):
                url = await postgres_database()
                if url is None:
                    break
                try:
                    redis_url = flush_redis(REDIS_URL)
                    results.append(await run("postgresql", url, count, args, redis_url,
                                             log_dir))
                finally:
                    await drop_postgres(url)

    header = (f"{'backend':<11} {'workers':>7} {'fired':>7} {'seconds':>8} {'fired/s':>8} "
              f"{'p50 s':>7} {'p99 s':>7} {'max s':>7} {'delivered':>9} {'no-op/s':>8} "
              f"{'fired/no-op':>11} {'raw/s':>7} {'CPU %':>7} {'peak RSS MB':>12}")
    print(header)
    print("-" * len(header))
    for r in results:
        mark = " " if r["complete"] else "*"
        rss = "/".join(f"{m:.0f}" for m in r["worker_peak_rss_mb"])
        cpu = "/".join(f"{c:.0f}" for c in r["worker_cpu_percent"])
        print(f"{r['backend']:<11} {r['workers']:>7} {r['fired']:>7} "
              f"{r['all_fired_seconds']:>7.0f}{mark} {r['fired_per_s']:>8.0f} "
              f"{r['lateness_p50_s']:>6.1f}{mark} {r['lateness_p99_s']:>6.1f}{mark} "
              f"{r['lateness_max_s']:>6.1f}{mark} {r['delivered']:>9} {r['noop_per_s']:>8.0f} "
              f"{r['fired_per_s'] / r['noop_per_s'] if r['noop_per_s'] else 0:>11.2f} "
              f"{r['raw_claims_per_s']:>7.0f} {cpu:>7} {rss:>12}")
    analyzes = [r["bench_analyzes"] for r in results if r["autovacuum"] == "off"]
    if analyzes:
        print(f"PostgreSQL runs with autovacuum off here: the bench ran ANALYZE "
              f"{'/'.join(map(str, analyzes))} times, as autovacuum would (--analyze-every)")
    if any(not r["complete"] for r in results):
        print(f"* PROJECTED: stopped after --deadline {args.deadline:.0f} s with timers left; "
              f"seconds and lateness are extrapolated from the rate so far (fired = actually "
              f"fired)")
    print(f"{args.timers} timers due at one instant (welcome chain, greeting -> tip); seconds "
          f"= due instant to the last one fired; lateness = finished_at - due_at; delivered = "
          f"messages the relay fake received meanwhile; no-op/s = read_fallback jobs whose "
          f"message is gone, same workers; raw/s = UPDATE ... RETURNING claims of {BATCH} "
          f"from the bench process; CPU % = each worker's CPU time while firing / seconds; peak "
          f"RSS = VmHWM per worker")
    print(f"total {time.perf_counter() - started:.0f} s; load average at the end "
          f"{os.getloadavg()[0]:.1f} (at the start {load_at_start:.1f}) on {os.cpu_count()} "
          f"CPUs: other processes share the machine when it is above the bench's own")
    return {"path": args.json, "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": os.uname().nodename, "cpus": os.cpu_count(),
            "load_average": {"start": load_at_start, "end": os.getloadavg()[0]},
            "args": {k: v for k, v in vars(args).items() if k != "json"},
            "results": results}


if __name__ == "__main__":
    write_report(asyncio.run(main()))

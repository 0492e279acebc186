"""The database handle: one async engine, one ``AsyncSession`` per unit of work.

SQLite (the embedded default) runs in WAL mode; every transaction starts with
``BEGIN IMMEDIATE`` so two writers never deadlock on a lock upgrade, and the pool holds one
connection so in-process writers queue fairly instead of spinning on ``busy_timeout``.
On SQLite the connection is handed to interactive work first (``ConnectionGate``): a
reply's turn or claim waits for the transaction in progress, not for every broadcast
transaction queued before it. PostgreSQL uses a normal pool; row claims use
``FOR UPDATE SKIP LOCKED``. Its sessions carry ``idle_in_transaction_session_timeout``
and ``statement_timeout``: a process frozen inside a transaction (SIGSTOP, a VM pause, a
swap storm) loses that transaction, and the rows it locked, after the timeout instead of
holding up other workers for as long as it stays frozen.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import event, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from bot_platform.errors import StorageUnavailable
from bot_platform.flows.conditions import register_sqlite_functions
from bot_platform.models import Base, KeyValue
from bot_platform.pg_driver import ping_idle_connections
from bot_platform.pipeline import wait_any
from bot_platform.statement_cache import keep_small_statements

log = logging.getLogger(__name__)


def _prepare_sqlite_path(url: str) -> None:
    database = make_url(url).database
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)


# A transaction left idle this long on PostgreSQL is ended by the server (its process is
# frozen or stuck); the lease (``WorkerSettings.lease_seconds``) usually sets it instead.
IDLE_IN_TRANSACTION_TIMEOUT = 60.0
STATEMENT_TIMEOUT = 120.0  # seconds one statement may run (a lock wait included)


SQLITE_WAIT = 120.0  # seconds a session may wait for SQLite's one connection


def idle_timeout_for(lease_seconds: float) -> float:
    """Twice a lease, at most a minute: a frozen holder loses its locks about when it
    loses its leases, and never keeps them longer than a minute."""
    return min(IDLE_IN_TRANSACTION_TIMEOUT, 2 * lease_seconds)


def create_engine(url: str, *, idle_in_transaction_timeout: float | None = None,
                  statement_timeout: float | None = None) -> AsyncEngine:
    """An async engine with the per-dialect settings this platform relies on. The
    timeouts (seconds, PostgreSQL only; None: the server's default) bound how long a
    session may hold locks without progress."""
    if url.startswith("sqlite"):
        _prepare_sqlite_path(url)
        from bot_platform.sqlite_driver import onehop_dbapi

        extra: dict[str, Any] = {}
        dbapi = onehop_dbapi()
        if dbapi is not None:
            extra["module"] = dbapi
        engine = create_async_engine(
            url, pool_size=1, max_overflow=0, pool_timeout=SQLITE_WAIT,
            # check_same_thread: Direct's statements run in the loop's thread
            # (bot_platform.direct.INLINE); aiosqlite's thread runs the rest.
            connect_args={"timeout": 30, "check_same_thread": False}, **extra,
        )

        @event.listens_for(engine.sync_engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            # Let us issue BEGIN ourselves (pysqlite's implicit BEGIN is DEFERRED).
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()
            register_sqlite_functions(dbapi_connection)  # what compiled segments call

        @event.listens_for(engine.sync_engine, "begin")
        def _on_begin(connection: Any) -> None:
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    if url.startswith("postgresql") and "+asyncpg" not in url:
        url = url.replace("postgresql://", "postgresql+asyncpg://", 1)
    server_settings = {}
    if idle_in_transaction_timeout:
        server_settings["idle_in_transaction_session_timeout"] = str(
            int(idle_in_transaction_timeout * 1000))
    if statement_timeout:
        server_settings["statement_timeout"] = str(int(statement_timeout * 1000))
    connect_args = {"server_settings": server_settings} if server_settings else {}
    # 20 kept, none as overflow: a web whose demand hovered around a pool of 10 closed
    # and reopened ~6 overflow connections a second (a server backend started each time,
    # every statement prepared again).
    engine = create_async_engine(url, pool_size=20, max_overflow=0,
                                 connect_args=connect_args)
    ping_idle_connections(engine)  # not pool_pre_ping: three trips per transaction
    event.listen(engine.sync_engine, "connect", keep_small_statements)  # ids lists: uncached
    return engine


# Set while the current task works for someone who waits (a webhook): its sessions are
# urgent unless it says otherwise (``Database.session``).
URGENT: contextvars.ContextVar[bool] = contextvars.ContextVar("botp_urgent", default=False)


class ConnectionGate:
    """SQLite's one pooled connection, handed to urgent waiters before the others.

    Why: the pool queues checkouts first come, first served; during a broadcast a
    reply's turn, and then its claim, each waited behind the broadcast's claims,
    result writes and send-job batches queued before it (issue 15). Through the gate an
    urgent session waits for the transaction in progress only."""

    def __init__(self) -> None:
        self._busy = False
        self._waiting: tuple[deque[asyncio.Future[None]], deque[asyncio.Future[None]]] = (
            deque(), deque())

    async def acquire(self, urgent: bool) -> None:
        if not self._busy:
            self._busy = True
            return
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[0 if urgent else 1].append(turn)
        try:
            await turn
        except BaseException:
            if turn.done() and not turn.cancelled():
                self.release()  # handed over just as the waiter was cancelled: pass it on
            else:
                turn.cancel()  # skipped by ``release``
            raise

    def release(self) -> None:
        for queue in self._waiting:
            while queue:
                turn = queue.popleft()
                if not turn.done():
                    turn.set_result(None)
                    return
        self._busy = False


class Database:
    """Owns the engine and hands out sessions. Built by the composition root."""

    def __init__(self, url: str, *,
                 idle_in_transaction_timeout: float | None = IDLE_IN_TRANSACTION_TIMEOUT,
                 statement_timeout: float | None = STATEMENT_TIMEOUT) -> None:
        self.url = url
        self.engine = create_engine(url, idle_in_transaction_timeout=idle_in_transaction_timeout,
                                    statement_timeout=statement_timeout)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        self.gate = ConnectionGate() if self.is_sqlite else None
        # Awaited before a session that is not urgent takes SQLite's connection: the
        # platform hands in its wait for answers under way (``pressure``), so a
        # broadcast's claim or write does not take the connection just before a reply's
        # turn needs it and hold it for several turns of a busy event loop.
        self.before_bulk: Callable[[], Awaitable[None]] | None = None

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    @asynccontextmanager
    async def session(self, urgent: bool | None = None) -> AsyncIterator[AsyncSession]:
        """A session inside one transaction: committed on success, rolled back on error.
        A database that is away raises ``StorageUnavailable`` (the driver's error as its
        cause): callers tell "try again later" from a statement that will never work.
        Writes still deferred on the session's ``Direct`` run before the commit.
        ``urgent``: someone waits for it (a reply's turn or claim; by default, whether
        ``URGENT`` is set); on SQLite it gets the connection before other waiting
        sessions (``ConnectionGate``), and the others wait for ``before_bulk`` first."""
        if self.gate is None:
            async with self._session() as session:
                yield session
            return
        if urgent is None:
            urgent = URGENT.get()
        if not urgent and self.before_bulk is not None:
            await self.before_bulk()
        try:
            async with asyncio.timeout(SQLITE_WAIT):  # as the pool's checkout did
                await self.gate.acquire(urgent)
        except TimeoutError as error:
            raise StorageUnavailable(
                f"waited {SQLITE_WAIT:.0f} s for the database connection") from error
        try:
            async with self._session() as session:
                yield session
        finally:
            self.gate.release()

    @asynccontextmanager
    async def _session(self) -> AsyncIterator[AsyncSession]:
        try:
            async with self.sessions() as session, session.begin():
                yield session
                deferred = session.info.get("direct")
                if deferred is not None and deferred.pending:
                    await deferred.flush()
        except Exception as error:
            converted = as_unavailable(error)
            if converted is error:
                raise
            raise converted from error

    async def ping(self) -> None:
        """One round trip to the database (the health check); ``StorageUnavailable``
        when it is away."""
        async with self.session() as session:
            await session.execute(text("SELECT 1"))

    async def create_all(self) -> None:
        """Create the schema directly (tests); deployments use ``botp migrate``."""
        async with self.engine.begin() as connection:
            await connection.run_sync(Base.metadata.create_all)

    async def close(self) -> None:
        await self.engine.dispose()


LISTENER = "botp-listener"  # application_name of the connections ``listen`` holds
_LISTENERS = ("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
              "AND application_name = $1 ORDER BY pid")


async def listen(url: str, channel: str, on_notify: Callable[[str], None],
                 stop: asyncio.Event,
                 on_share: Callable[[int, int], None] | None = None) -> None:
    """Call ``on_notify(payload)`` for each ``NOTIFY channel`` until ``stop`` is set
    (PostgreSQL); the connection is made again after the database restarts, and
    ``on_notify("")`` is called on every (re)connection for what was queued while nobody
    listened. ``on_share(index, count)``, every second: this listener's place among the
    database's listeners (the workers), so a NOTIFY can be one worker's to act on
    (``OutboxClaims.named``); (0, 1) while not listening."""
    import asyncpg

    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    while not stop.is_set():
        connection = None
        try:
            connection = await asyncpg.connect(
                dsn, timeout=10, server_settings={"application_name": LISTENER})
            await connection.add_listener(
                channel, lambda _connection, _pid, _channel, payload: on_notify(payload))
            on_notify("")
            while not stop.is_set() and not connection.is_closed():
                if on_share is not None:
                    pids = [row[0] for row in await connection.fetch(_LISTENERS, LISTENER)]
                    me = connection.get_server_pid()
                    on_share(*((pids.index(me), len(pids)) if me in pids else (0, 1)))
                await wait_any(1.0, stop)
        except Exception as error:  # the database is away: polling covers it meanwhile
            log.warning("listening for %s failed (%s); retrying", channel,
                        type(error).__name__)
            await wait_any(2.0, stop)
        finally:
            if on_share is not None:
                on_share(0, 1)  # not heard: every NOTIFY is this worker's again
            if connection is not None and not connection.is_closed():
                with contextlib.suppress(Exception):
                    await connection.close(timeout=2)


def is_transient_db_error(error: BaseException) -> bool:
    """The database is away for a moment (restart, failover, a lost connection, a busy
    SQLite file), as opposed to a statement that will never succeed."""
    from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, ProgrammingError

    # OSError: TimeoutError and ConnectionError among them.
    if isinstance(error, OSError | StorageUnavailable):
        return True
    if isinstance(error, IntegrityError | ProgrammingError | DataError):
        return False
    return isinstance(error, DBAPIError)


def as_unavailable(error: Exception) -> Exception:
    """``StorageUnavailable`` for an error that means the database is away for a moment
    (raise it ``from error``); any other error as it is."""
    if isinstance(error, StorageUnavailable) or not is_transient_db_error(error):
        return error
    return StorageUnavailable(
        f"the database is unavailable ({type(error).__name__}: {error})")


def insert_ignore(session: AsyncSession | str, model: Any) -> Any:
    """``INSERT ... ON CONFLICT DO NOTHING`` for the session's dialect (or a dialect's
    name)."""
    dialect = session if isinstance(session, str) else session.bind.dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert(model).on_conflict_do_nothing()




class SqlKeyValueStore:
    """``KeyValueStore`` on the ``kv`` table."""

    def __init__(self, db: Database, clock: Any) -> None:
        self.db = db
        self.clock = clock

    async def get(self, key: str) -> str | None:
        async with self.db.session() as session:
            return await session.scalar(select(KeyValue.value).where(KeyValue.key == key))

    async def set(self, key: str, value: str) -> None:
        now: datetime = self.clock.now()
        async with self.db.session() as session:
            row = await session.get(KeyValue, key)
            if row is None:
                session.add(KeyValue(key=key, value=value, updated_at=now))
            else:
                row.value, row.updated_at = value, now

"""The database handle: one async engine, one ``AsyncSession`` per unit of work.

SQLite (the embedded default) runs in WAL mode; every transaction starts with
``BEGIN IMMEDIATE`` so two writers never deadlock on a lock upgrade, and the pool holds one
connection so in-process writers queue fairly instead of spinning on ``busy_timeout``.
PostgreSQL uses a normal pool; row claims use ``FOR UPDATE SKIP LOCKED``. Its sessions
carry ``idle_in_transaction_session_timeout`` and ``statement_timeout``: a process frozen
inside a transaction (SIGSTOP, a VM pause, a swap storm) loses that transaction, and the
rows it locked, after the timeout instead of holding up other workers for as long as it
stays frozen.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import event, insert, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from bot_platform.errors import StorageUnavailable
from bot_platform.flows.conditions import register_sqlite_functions
from bot_platform.models import Base, KeyValue
from bot_platform.pipeline import wait_any

log = logging.getLogger(__name__)


def _prepare_sqlite_path(url: str) -> None:
    database = make_url(url).database
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)


# A transaction left idle this long on PostgreSQL is ended by the server (its process is
# frozen or stuck); the lease (``WorkerSettings.lease_seconds``) usually sets it instead.
IDLE_IN_TRANSACTION_TIMEOUT = 60.0
STATEMENT_TIMEOUT = 120.0  # seconds one statement may run (a lock wait included)


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
            url, pool_size=1, max_overflow=0, pool_timeout=120,
            connect_args={"timeout": 30}, **extra,
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
    return create_async_engine(url, pool_size=10, max_overflow=10, pool_pre_ping=True,
                               connect_args=connect_args)


class Database:
    """Owns the engine and hands out sessions. Built by the composition root."""

    def __init__(self, url: str, *,
                 idle_in_transaction_timeout: float | None = IDLE_IN_TRANSACTION_TIMEOUT,
                 statement_timeout: float | None = STATEMENT_TIMEOUT) -> None:
        self.url = url
        self.engine = create_engine(url, idle_in_transaction_timeout=idle_in_transaction_timeout,
                                    statement_timeout=statement_timeout)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        """A session inside one transaction: committed on success, rolled back on error.
        A database that is away raises ``StorageUnavailable`` (the driver's error as its
        cause): callers tell "try again later" from a statement that will never work."""
        try:
            async with self.sessions() as session, session.begin():
                yield session
        except StorageUnavailable:
            raise
        except Exception as error:
            if not is_transient_db_error(error):
                raise
            raise StorageUnavailable(
                f"the database is unavailable ({type(error).__name__}: {error})") from error

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


async def listen(url: str, channel: str, on_notify: Callable[[], None],
                 stop: asyncio.Event) -> None:
    """Call ``on_notify`` for each ``NOTIFY channel`` until ``stop`` is set (PostgreSQL);
    the connection is made again after the database restarts, and ``on_notify`` is called
    on every (re)connection for what was queued while nobody listened."""
    import asyncpg

    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    while not stop.is_set():
        connection = None
        try:
            connection = await asyncpg.connect(dsn, timeout=10)
            await connection.add_listener(channel, lambda *_: on_notify())
            on_notify()
            while not stop.is_set() and not connection.is_closed():
                await wait_any(1.0, stop)
        except Exception as error:  # the database is away: polling covers it meanwhile
            log.warning("listening for %s failed (%s); retrying", channel,
                        type(error).__name__)
            await wait_any(2.0, stop)
        finally:
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


def insert_ignore(session: AsyncSession | str, model: Any) -> Any:
    """``INSERT ... ON CONFLICT DO NOTHING`` for the session's dialect (or a dialect's
    name)."""
    dialect = session if isinstance(session, str) else session.bind.dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert(model).on_conflict_do_nothing()


_RETURNING_IDS: dict[Any, Any] = {}  # per table: INSERT ... RETURNING id, built once


async def insert_returning_ids(session: AsyncSession, model: Any,
                               rows: list[dict[str, Any]]) -> list[int]:
    """Insert many rows; their new ids in the order of ``rows``.

    On SQLite the rows go row by row in one trip to aiosqlite's thread (``Direct``); our
    transactions hold the write lock (BEGIN IMMEDIATE), so the ids increase in order.
    PostgreSQL batches the ordered form itself."""
    table = getattr(model, "__table__", model)  # Core: no ORM bulk-insert machinery
    if session.bind.dialect.name == "sqlite":
        return sorted(row[0] for row in (await (await direct(session)).execute(
            _returning_ids(table), rows)).rows)
    return list((await session.execute(
        insert(table).returning(table.c.id, sort_by_parameter_order=True), rows)).scalars())


def _returning_ids(table: Any) -> Any:
    statement = _RETURNING_IDS.get(table)
    if statement is None:
        statement = _RETURNING_IDS[table] = insert(table).returning(table.c.id)
    return statement


async def insert_linked(session: AsyncSession, parent: Any, parent_rows: list[dict[str, Any]],
                        child: Any, child_rows: list[dict[str, Any]], link: str
                        ) -> tuple[list[int], list[int]]:
    """Insert parent rows, then one child row per parent whose ``link`` column is that
    parent's new id (an outbox row and its message); both lists of new ids, in order.
    On SQLite both inserts are one trip to the database."""
    parent_table = getattr(parent, "__table__", parent)
    child_table = getattr(child, "__table__", child)
    connection = await direct(session) if session.bind.dialect.name == "sqlite" else None
    if connection is not None and parent_rows:
        first = connection._prepared(_returning_ids(parent_table), parent_rows)
        second = connection._prepared(_returning_ids(child_table),
                                      [{**row, link: 0} for row in child_rows])
        if first is not None and second is not None:
            return await connection.linked(first, second, second[0].names.index(link))
    parent_ids = await insert_returning_ids(session, parent_table, parent_rows)
    child_ids = await insert_returning_ids(session, child_table, [
        {**row, link: parent_id} for row, parent_id in zip(child_rows, parent_ids,
                                                           strict=True)])
    return parent_ids, child_ids


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


# ---- the hot path's statements on the driver ------------------------------------------------


@dataclass(slots=True)
class Rows:
    """What a statement run by ``Direct`` returned: rows (processed: datetimes, JSON),
    their column names and the affected row count."""

    rows: list[tuple[Any, ...]]
    keys: tuple[str, ...]
    rowcount: int

    def first(self) -> dict[str, Any] | None:
        return dict(zip(self.keys, self.rows[0], strict=True)) if self.rows else None

    def scalar(self) -> Any:
        return self.rows[0][0] if self.rows else None


@dataclass(frozen=True, slots=True)
class _Compiled:
    sql: str
    names: tuple[str, ...]  # bind names in positional order
    binds: dict[str, Callable[[Any], Any]]  # bind processors (datetime, JSON to text)
    results: tuple[Callable[[Any], Any] | None, ...]  # result processors per column
    keys: tuple[str, ...]
    construct: Callable[..., dict[str, Any]]


_COMPILED: dict[tuple[Any, str, tuple[str, ...]], _Compiled | None] = {}


def _compile(statement: Any, dialect: Any, keys: tuple[str, ...]) -> _Compiled | None:
    """The statement compiled once per dialect and parameter names; None when it needs
    SQLAlchemy's execution (Python-side defaults, expanding IN)."""
    cache_key = (statement, dialect.name, keys)
    if cache_key in _COMPILED:
        return _COMPILED[cache_key]
    compiled = statement.compile(dialect=dialect, column_keys=list(keys))
    plain = (not compiled.insert_prefetch and not compiled.update_prefetch
             and "POSTCOMPILE" not in compiled.string and compiled.positiontup is not None)
    result: _Compiled | None = None
    if plain:
        result = _Compiled(
            compiled.string, tuple(compiled.positiontup or ()),
            {k: v for k, v in compiled._bind_processors.items() if v is not None},
            tuple(entry[3]._cached_result_processor(dialect, None)
                  for entry in compiled._result_columns),
            tuple(entry[0] for entry in compiled._result_columns),
            compiled.construct_params)
    if len(_COMPILED) > 2000:  # only module-level statements come here; a safety bound
        _COMPILED.clear()
    _COMPILED[cache_key] = result
    return result


def _run_in_sqlite_thread(connection: Any, sql: str, rows: list[tuple[Any, ...]],
                          fetch: bool) -> tuple[list[Any], int]:
    """Runs in aiosqlite's thread: the statement for each parameter row in one trip."""
    cursor = connection.cursor()
    try:
        if not fetch and len(rows) > 1:
            cursor.executemany(sql, rows)
            return [], cursor.rowcount
        found: list[Any] = []
        count = 0
        for params in rows:
            cursor.execute(sql, params)
            if fetch:
                found.extend(cursor.fetchall())
            count += max(cursor.rowcount, 0)
        return found, count
    finally:
        cursor.close()


def _run_linked_in_sqlite_thread(connection: Any, pending: list[tuple[str, list[Any], bool]],
                                 first: tuple[str, list[Any]], second: tuple[str, list[Any]],
                                 link: int) -> tuple[list[int], list[int]]:
    """Runs in aiosqlite's thread: deferred statements, the parents, then the children
    with their parents' ids at position ``link``."""
    _run_batch_in_sqlite_thread(connection, pending)
    parents = [row[0] for row in _run_in_sqlite_thread(connection, first[0], first[1], True)[0]]
    rows = [(*row[:link], parent, *row[link + 1:])
            for row, parent in zip(second[1], parents, strict=True)]
    children = [row[0] for row in _run_in_sqlite_thread(connection, second[0], rows, True)[0]]
    return parents, children


def _run_batch_in_sqlite_thread(connection: Any, batch: list[tuple[str, list[Any], bool]]
                                ) -> tuple[list[Any], int]:
    """Runs in aiosqlite's thread: statements one after the other; the last one's result."""
    found: tuple[list[Any], int] = ([], 0)
    for sql, rows, fetch in batch:
        found = _run_in_sqlite_thread(connection, sql, rows, fetch)
    return found


class Direct:
    """Core statements of the hot path run on the driver itself: SQLAlchemy compiles
    each once, and on SQLite every run is one trip to aiosqlite's thread with none of
    the execution machinery around it (about 100 us of Python a statement, against 20
    for the trip). Other dialects, and statements that need SQLAlchemy's execution
    (Python-side defaults), go through the connection as usual. Only module-level
    statements may come here (the compiled forms are cached by statement).

    With ``defer`` set, ``write`` (a statement whose result nobody reads) waits for the
    next trip: it goes with the next ``execute`` or ``flush``, in order. Whoever sets
    ``defer`` flushes before the transaction commits; an error in a deferred statement
    is raised there and rolls the whole transaction back like any other."""

    __slots__ = ("connection", "defer", "dialect", "pending", "raw", "transaction")

    def __init__(self, connection: AsyncConnection, raw: Any) -> None:
        self.connection = connection
        self.dialect = connection.dialect
        self.raw = raw
        self.defer = False
        self.pending: list[tuple[str, list[Any], bool]] = []
        self.transaction: Any = None

    @classmethod
    async def of(cls, connection: AsyncConnection) -> Direct:
        raw = None
        if connection.dialect.name == "sqlite":
            driver = (await connection.get_raw_connection()).driver_connection
            if hasattr(driver, "_execute") and hasattr(driver, "_conn"):
                raw = driver
        return cls(connection, raw)

    def _prepared(self, statement: Any, many: list[dict[str, Any]]
                  ) -> tuple[_Compiled, list[Any]] | None:
        compiled = None
        if self.raw is not None and many:
            compiled = _compile(statement, self.dialect, tuple(many[0]))
        if compiled is None:
            return None
        binds, names = compiled.binds, compiled.names
        positional = []
        for row in many:
            values = compiled.construct(row)
            positional.append(tuple(binds[n](values[n]) if n in binds else values[n]
                                    for n in names))
        return compiled, positional

    async def write(self, statement: Any,
                    params: dict[str, Any] | list[dict[str, Any]]) -> None:
        """Run a statement whose result nobody reads (deferred to the next trip when
        ``defer`` is set)."""
        many = params if isinstance(params, list) else [params]
        prepared = self._prepared(statement, many) if self.defer else None
        if prepared is None:
            await self.execute(statement, params)
            return
        compiled, positional = prepared
        self.pending.append((compiled.sql, positional, False))

    async def flush(self) -> None:
        """Run the deferred statements now (one trip)."""
        if self.pending:
            await self._trip([])

    async def _trip(self, batch: list[tuple[str, list[Any], bool]]) -> tuple[list[Any], int]:
        import sqlite3

        batch, self.pending = [*self.pending, *batch], []
        try:
            return await self.raw._execute(_run_batch_in_sqlite_thread, self.raw._conn, batch)
        except sqlite3.Error as error:
            from sqlalchemy.exc import DBAPIError

            raise DBAPIError.instance(batch[-1][0], batch[-1][1], error,
                                      sqlite3.Error) from error

    async def linked(self, first: tuple[_Compiled, list[Any]],
                     second: tuple[_Compiled, list[Any]], link: int
                     ) -> tuple[list[int], list[int]]:
        """See ``insert_linked``: both inserts (and what was deferred) in one trip."""
        import sqlite3

        pending, self.pending = self.pending, []
        try:
            return await self.raw._execute(
                _run_linked_in_sqlite_thread, self.raw._conn, pending,
                (first[0].sql, first[1]), (second[0].sql, second[1]), link)
        except sqlite3.Error as error:
            from sqlalchemy.exc import DBAPIError

            raise DBAPIError.instance(second[0].sql, second[1], error,
                                      sqlite3.Error) from error

    async def execute(self, statement: Any,
                      params: dict[str, Any] | list[dict[str, Any]]) -> Rows:
        many = params if isinstance(params, list) else [params]
        prepared = self._prepared(statement, many)
        if prepared is None:
            await self.flush()
            result = await self.connection.execute(statement, params)
            if result.returns_rows:
                return Rows([tuple(r) for r in result.all()], tuple(result.keys()), -1)
            return Rows([], (), result.rowcount)
        compiled, positional = prepared
        found, count = await self._trip([(compiled.sql, positional, bool(compiled.keys))])
        processors = compiled.results
        if found and any(processors):
            found = [tuple(p(v) if p is not None else v for p, v in zip(
                processors, row, strict=True)) for row in found]
        return Rows(found, compiled.keys, count)


async def direct(session: AsyncSession) -> Direct:
    """The session's ``Direct`` for this transaction (kept in ``session.info``), after
    flushing what the ORM holds (Core statements do not autoflush)."""
    if session.new or session.dirty or session.deleted:
        await session.flush()
    found = session.info.get("direct")
    transaction = session.sync_session.get_transaction()
    if found is None or transaction is None or found.transaction is not transaction:
        if found is not None and found.pending:
            raise RuntimeError("deferred statements of an ended transaction were never run")
        found = session.info["direct"] = await Direct.of(await session.connection())
        found.transaction = session.sync_session.get_transaction()
    return found

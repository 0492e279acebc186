"""PostgreSQL's side of ``Direct``: the hot path's statements as asyncpg prepared statements.

SQLAlchemy's execution costs about 150-200 microseconds of Python a statement (context,
cursor, result objects) against about 40 for asyncpg's own trip; an inbound event is a
dozen statements. Here a compiled statement (``direct.compile_plain``, once per dialect) is
prepared once per connection, in the SQLAlchemy adapter's own cache of prepared
statements, and run with its positional parameters; the transaction is the adapter's, so
the session's commit and rollback stay as they are. Errors come out as SQLAlchemy's
(``IntegrityError``, ...), as if the statement had gone through the session, and a lost
connection is invalidated so the pool does not hand it out again.

Writes that wait for the next trip (``Direct.defer``) cannot share a trip with it the way
SQLite's do (asyncpg sends one statement at a time), so they ride inside it: the deferred
single-row writes and the statement after them become one statement, the writes as
data-modifying ``WITH`` clauses (``merge_writes``). PostgreSQL runs the parts of such a
statement on one snapshot and in no set order, so only statements on tables none of the
others names are merged; a statement on a table already in the group starts the next.

A connection is pinged (``SELECT`` ``;``) only when it comes out of the pool after lying
idle (``PING_IDLE_AFTER``), not on every checkout: ``pool_pre_ping`` cost three trips
(BEGIN, ``;``, ROLLBACK) per transaction. A connection that died while in use fails its
statement (``StorageUnavailable``: a 503) and SQLAlchemy then invalidates the whole pool.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from typing import Any

from sqlalchemy import event
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

PING_IDLE_AFTER = 5.0  # seconds in the pool after which a connection is pinged first
_COUNT = re.compile(r"(\d+)$")
_PARAMETER = re.compile(r"\$(\d+)")
_MERGED: dict[tuple[str, ...], str] = {}  # the SQL of each merged group, built once

Batch = list[tuple[str, list[Any], bool]]  # (SQL, positional parameter rows, fetch rows)


def ping_idle_connections(engine: AsyncEngine) -> None:
    """Ping a pooled connection on checkout only when it lay idle: one that just served a
    transaction is alive, and pinging it cost three trips per transaction."""

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(_dbapi_connection: Any, record: Any) -> None:
        record.info["returned"] = time.monotonic()

    @event.listens_for(engine.sync_engine, "checkin")
    def _on_checkin(_dbapi_connection: Any, record: Any) -> None:
        if record is not None:
            record.info["returned"] = time.monotonic()

    @event.listens_for(engine.sync_engine, "checkout")
    def _on_checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        if time.monotonic() - record.info.get("returned", 0.0) < PING_IDLE_AFTER:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as error:  # the pool replaces it (and reconnects, or raises)
            raise DisconnectionError(f"a pooled connection is gone ({error})") from error


async def adapter_of(connection: AsyncConnection) -> Any | None:
    """SQLAlchemy's asyncpg adapter under this connection (None for other drivers)."""
    adapter = (await connection.get_raw_connection()).dbapi_connection
    needed = ("_prepare", "_start_transaction", "_execute_mutex", "_handle_exception")
    return adapter if all(hasattr(adapter, name) for name in needed) else None


def _rowcount(status: str | None) -> int:
    found = _COUNT.search(status or "")
    return int(found.group(1)) if found else -1


def merge_writes(batch: Batch, tables: Mapping[str, frozenset[str]]) -> Batch:
    """The batch with runs of single-row statements on disjoint tables merged into one
    statement each (all but the last of a run as ``WITH`` clauses); ``tables`` names the
    tables each statement reads or writes (statements not in it stay alone)."""
    if len(batch) < 2:
        return batch
    merged: Batch = []
    group: list[tuple[str, tuple[Any, ...], bool]] = []
    touched: set[str] = set()
    for sql, rows, fetch in batch:
        names = tables.get(sql)
        if names is None or len(rows) != 1 or "'" in sql:
            merged.extend(_combined(group))
            group, touched = [], set()
            merged.append((sql, rows, fetch))
            continue
        if names & touched:
            merged.extend(_combined(group))
            group, touched = [], set()
        group.append((sql, tuple(rows[0]), fetch))
        touched |= names
        if sql.startswith("WITH "):  # its clauses join the group's: nothing can follow
            merged.extend(_combined(group))
            group, touched = [], set()
    merged.extend(_combined(group))
    return merged


def _combined(group: list[tuple[str, tuple[Any, ...], bool]]) -> Batch:
    """One statement for the group: every part but the last in a ``WITH`` clause, the
    parameters numbered on across the parts; the last part's result."""
    if len(group) <= 1:
        return [(sql, [params], fetch) for sql, params, fetch in group]
    key = tuple(sql for sql, _, _ in group)
    sql = _MERGED.get(key)
    if sql is None:
        parts, shift = [], 0
        for part, params, _ in group:
            parts.append(_PARAMETER.sub(
                lambda found, by=shift: f"${int(found.group(1)) + by}", part))
            shift += len(params)
        clauses = ", ".join(f"w{n} AS ({part})" for n, part in enumerate(parts[:-1]))
        last = parts[-1]
        sql = (f"WITH {clauses}, {last.removeprefix('WITH ')}" if last.startswith("WITH ")
               else f"WITH {clauses} {last}")
        if len(_MERGED) > 1000:  # groups come from module-level statements; a bound
            _MERGED.clear()
        _MERGED[key] = sql
    return [(sql, [tuple(value for _, params, _ in group for value in params)],
             group[-1][2])]


async def run_batch(connection: AsyncConnection, adapter: Any, batch: Batch,
                    tables: Mapping[str, frozenset[str]] | None = None
                    ) -> tuple[list[Any], int]:
    """The statements one after the other, in the adapter's transaction (begun here if
    the session has not yet), single-row writes merged (``merge_writes``) when
    ``tables`` says what each statement touches; the last one's rows and row count (-1 for many rows
    without a result: they go as one pipelined ``executemany``)."""
    dialect = connection.dialect
    found: list[Any] = []
    count = -1
    if tables is not None:
        batch = merge_writes(batch, tables)
    async with adapter._execute_mutex:
        if adapter._transaction is None:
            await adapter._start_transaction()
        for sql, rows, fetch in batch:
            try:
                statement, _ = await adapter._prepare(sql, dialect._invalidate_schema_cache_asof)
                if not fetch and len(rows) > 1:
                    await statement.executemany(rows)
                    found, count = [], -1
                    continue
                found, count = [], 0
                for params in rows:
                    got = await statement.fetch(*params)
                    if fetch:
                        found.extend(got)
                    count += max(_rowcount(statement.get_statusmsg()), 0)
            except Exception as error:
                await _raise_translated(connection, adapter, sql, rows, error)
    return found, count


async def fetch_alone(engine: AsyncEngine, sql: str, params: tuple[Any, ...]
                      ) -> tuple[list[Any], int]:
    """One statement in a transaction of its own (PostgreSQL's implicit one: no BEGIN or
    COMMIT trip), prepared on a pooled connection: one round trip. For a statement that
    is a whole unit of work by itself (a worker's claim, its send results). Its rows
    and row count."""
    async with engine.connect() as connection:
        adapter = await adapter_of(connection)
        if adapter is None:
            raise RuntimeError("not an asyncpg connection")
        async with adapter._execute_mutex:
            try:
                statement, _ = await adapter._prepare(
                    sql, connection.dialect._invalidate_schema_cache_asof)
                rows = await statement.fetch(*params)
            except Exception as error:
                await _raise_translated(connection, adapter, sql, [params], error)
        return rows, _rowcount(statement.get_statusmsg())


async def begin_with(connection: AsyncConnection, adapter: Any, sql: str,
                     status: list[str] | None = None) -> bool:
    """Begin the adapter's transaction and run ``sql`` (no parameters: the simple query
    protocol) in the same trip; False when that cannot be done (a transaction is open,
    a non-default isolation, asyncpg's transaction object not as expected) and nothing
    was run. The transaction is then the adapter's own, as if it had begun it: the
    session commits or rolls it back (also when ``sql`` failed). ``status`` gets the
    status of ``sql``'s last statement."""
    from asyncpg.transaction import TransactionState

    raw = adapter._connection
    if (adapter._transaction is not None or adapter.isolation_level is not None
            or adapter.readonly or adapter.deferrable or raw.is_in_transaction()
            or getattr(raw, "_top_xact", True) is not None):
        return False
    transaction = raw.transaction()
    if not hasattr(transaction, "_state"):
        return False
    async with adapter._execute_mutex:
        # What ``Transaction.start`` does, with ``sql`` in the same query.
        raw._top_xact = transaction
        transaction._state = TransactionState.STARTED
        adapter._transaction = transaction
        try:
            done = await raw.execute(f"BEGIN; {sql}")
        except Exception as error:
            await _raise_translated(connection, adapter, sql, [], error)
    if status is not None:
        status.append(str(done))
    return True


async def commit_with(connection: AsyncConnection, adapter: Any, sql: str) -> bool:
    """Run ``sql`` (no parameters: the simple query protocol) and ``COMMIT`` the
    adapter's transaction in the same trip; False when that cannot be done (no
    transaction of the adapter's own, or not as expected) and nothing was run. The
    session's commit then finds nothing to commit; if ``sql`` fails, the transaction is
    still open (aborted) and the session rolls it back as usual."""
    from asyncpg.transaction import TransactionState

    transaction = adapter._transaction
    raw = adapter._connection
    if (transaction is None or getattr(raw, "_top_xact", None) is not transaction
            or getattr(transaction, "_state", None) is not TransactionState.STARTED
            or getattr(transaction, "_nested", True)):
        return False
    async with adapter._execute_mutex:
        try:
            await raw.execute(f"{sql}; COMMIT")
        except Exception as error:
            await _raise_translated(connection, adapter, sql, [], error)
        # What ``Transaction.commit`` does around its COMMIT.
        raw._top_xact = None
        transaction._state = TransactionState.COMMITTED
        adapter._transaction = None
    return True


async def _raise_translated(connection: AsyncConnection, adapter: Any, sql: str,
                            rows: list[Any], error: Exception) -> None:
    """Raise ``error`` as SQLAlchemy would have (its ``DBAPIError`` subclasses), after
    invalidating a connection that is gone."""
    dialect = connection.dialect
    try:
        adapter._handle_exception(error)  # raises the DB-API form of the error
    except dialect.loaded_dbapi.Error as translated:
        gone = dialect.is_disconnect(translated, adapter, None)
        if gone:
            await connection.invalidate(translated)
        raise DBAPIError.instance(sql, rows, translated, dialect.loaded_dbapi.Error,
                                  connection_invalidated=gone, dialect=dialect) from error


async def simple(connection: AsyncConnection, adapter: Any, sql: str) -> str:
    """Run ``sql`` (constant statements, no parameters: the simple query protocol, one
    trip) in the adapter's transaction, beginning it in the same trip when none is open
    (as ``begin_with``); the status of its last statement (``SELECT 1``). Also runs in
    an aborted transaction (``ROLLBACK TO SAVEPOINT``)."""
    if adapter._transaction is None:
        status: list[str] = []
        if await begin_with(connection, adapter, sql, status):
            return status[0]
        async with adapter._execute_mutex:
            await adapter._start_transaction()
    async with adapter._execute_mutex:
        try:
            return str(await adapter._connection.execute(sql))
        except Exception as error:
            await _raise_translated(connection, adapter, sql, [], error)
    raise AssertionError("unreachable")

"""The hot path's statements on the driver: Core statements compiled once per dialect and
run without SQLAlchemy's execution: on SQLite on aiosqlite's thread in few trips (writes
whose result nothing reads wait for the next statement that returns something, or the
commit), on PostgreSQL as asyncpg prepared statements (``pg_driver``). Any statement that
needs Python-side defaults goes through the SQLAlchemy connection."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    CompoundSelect,
    DateTime,
    Delete,
    Insert,
    Select,
    Update,
    text,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.sql.util import find_tables

from bot_platform import pg_driver
from bot_platform.statement_forms import TABLES, Columns, arrays_form, linked_arrays

log = logging.getLogger(__name__)


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
    defaults: dict[str, Any]  # constant column defaults of an INSERT (SQLAlchemy's prefetch)
    # What ``construct`` and ``binds`` make of a parameter row, worked out once: the
    # positional row with the statement's constants in place (processed), and for each
    # position taken from the row its index, the row's key and the bind processor.
    template: tuple[Any, ...]
    slots: tuple[tuple[int, str, Callable[[Any], Any] | None], ...]


class _Key:
    """A stand-in for a parameter row's value: where ``construct`` puts it tells which
    positional parameter that key feeds."""

    __slots__ = ("key",)

    def __init__(self, key: str) -> None:
        self.key = key


_DATETIME_MEMO_SIZE = 4096


def _memoized(process: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A datetime bind processor that remembers its answers: a batch binds each turn's
    moment into several rows (state, timer, message, outbox), and formatting one costs
    more than looking it up."""
    memo: dict[Any, Any] = {}

    def memoized(value: Any) -> Any:
        try:
            return memo[value]
        except KeyError:
            pass
        except TypeError:  # not hashable
            return process(value)
        if len(memo) >= _DATETIME_MEMO_SIZE:
            memo.clear()
        found = memo[value] = process(value)
        return found

    return memoized


def each_processed(values: list[Any], process: Callable[[Any], Any]) -> list[Any]:
    """``process`` of each value, run once per distinct object: a batch's rows share one
    payload dict or one moment (a JSON dump each cost more than the rest of a row)."""
    distinct = {id(value): value for value in values}
    done = {key: process(value) for key, value in distinct.items()}
    return [done[id(value)] for value in values]


def _plan(compiled: Any, keys: tuple[str, ...], defaults: dict[str, Any],
          names: tuple[str, ...], binds: dict[str, Callable[[Any], Any]]
          ) -> tuple[tuple[Any, ...], tuple[tuple[int, str, Callable[[Any], Any] | None], ...]]:
    """``_Compiled.template`` and ``slots``: ``construct`` run once on stand-ins."""
    values = compiled.construct_params({**defaults, **{key: _Key(key) for key in keys}})
    template: list[Any] = []
    slots: list[tuple[int, str, Callable[[Any], Any] | None]] = []
    for index, name in enumerate(names):
        value = values[name]
        process = binds.get(name)
        if isinstance(value, _Key):
            template.append(None)
            bind = compiled.binds.get(name)
            if process is not None and bind is not None and getattr(
                    bind.type, "_type_affinity", None) is DateTime:
                process = _memoized(process)
            slots.append((index, value.key, process))
        else:
            template.append(process(value) if process is not None else value)
    return tuple(template), tuple(slots)


_ADVISORY_LOCK = text("SELECT pg_advisory_xact_lock(:key)")
_COMPILED: dict[tuple[Any, str, tuple[str, ...]], _Compiled | None] = {}


def compile_plain(statement: Any, dialect: Any, keys: tuple[str, ...]) -> _Compiled | None:
    """The statement compiled once per dialect and parameter names; None when it needs
    SQLAlchemy's execution (Python-side defaults other than constants, expanding IN)."""
    cache_key = (statement, dialect.name, keys)
    if cache_key in _COMPILED:
        return _COMPILED[cache_key]
    if len(_COMPILED) > 2000:  # only module-level statements come here; a safety bound
        _COMPILED.clear()
        TABLES.clear()
    compiled = statement.compile(dialect=dialect, column_keys=list(keys))
    defaults = {column.key: column.default.arg for column in compiled.insert_prefetch
                if column.default is not None and column.default.is_scalar}
    plain = (len(defaults) == len(compiled.insert_prefetch) and not compiled.update_prefetch
             and "POSTCOMPILE" not in compiled.string and compiled.positiontup is not None)
    result: _Compiled | None = None
    if plain:
        names = tuple(compiled.positiontup or ())
        binds = {k: v for k, v in compiled._bind_processors.items() if v is not None}
        result = _Compiled(
            compiled.string, names, binds,
            tuple(entry[3]._cached_result_processor(dialect, None)
                  for entry in compiled._result_columns),
            tuple(entry[0] for entry in compiled._result_columns),
            compiled.construct_params, defaults,
            *_plan(compiled, keys, defaults, names, binds))
        if isinstance(statement, Insert | Update | Delete | Select | CompoundSelect):
            TABLES[result.sql] = frozenset(
                table.name for table in find_tables(statement, include_crud=True))
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


def run_batch_in_sqlite_thread(connection: Any, batch: list[tuple[str, list[Any], bool]]
                                ) -> tuple[list[Any], int]:
    """Runs in aiosqlite's thread: statements one after the other; the last one's result."""
    found: tuple[list[Any], int] = ([], 0)
    for sql, rows, fetch in batch:
        found = _run_in_sqlite_thread(connection, sql, rows, fetch)
    return found


# Set on an aiosqlite connection opened with ``check_same_thread=False``
# (``sqlite_driver``): ``Direct`` may run its statements in the event loop's thread.
INLINE = "botp_inline"
# Parameter rows above which a trip inside our transaction runs on aiosqlite's thread
# (``Direct.call``): its SQLite work then overlaps the event loop's (sqlite3 lets go of
# the GIL while a statement steps) instead of stalling it.
INLINE_ROWS = 50


class Direct:
    """Core statements of the hot path run on the driver itself: SQLAlchemy compiles
    each once, and every run is one trip with none of the execution machinery around it
    (about 100 us of Python a statement, against 20 for the trip): to aiosqlite's thread
    on SQLite, an asyncpg prepared statement on PostgreSQL. Other drivers, and
    statements that need SQLAlchemy's execution (Python-side defaults), go through the
    connection as usual. Only module-level statements may come here (the compiled forms
    are cached by statement).

    With ``defer`` set, ``write`` (a statement whose result nobody reads) waits for the
    next trip: it goes with the next ``execute`` or ``flush``, in order (on PostgreSQL
    inside the next statement where ``pg_driver.merge_writes`` allows). What is still
    deferred runs before the commit (``Database.session``); an error in a deferred
    statement is raised there and rolls the whole transaction back like any other."""

    __slots__ = ("adapter", "connection", "defer", "dialect", "pending", "raw", "transaction")

    def __init__(self, connection: AsyncConnection, raw: Any, adapter: Any = None) -> None:
        self.connection = connection
        self.dialect = connection.dialect
        self.raw = raw  # aiosqlite's connection (SQLite)
        self.adapter = adapter  # SQLAlchemy's asyncpg adapter (PostgreSQL)
        self.defer = False
        self.pending: list[tuple[str, list[Any], bool]] = []
        self.transaction: Any = None

    @classmethod
    async def of(cls, connection: AsyncConnection) -> Direct:
        raw = adapter = None
        if connection.dialect.name == "sqlite":
            driver = (await connection.get_raw_connection()).driver_connection
            if hasattr(driver, "_execute") and hasattr(driver, "_conn"):
                raw = driver
        elif connection.dialect.name == "postgresql":
            adapter = await pg_driver.adapter_of(connection)
        return cls(connection, raw, adapter)

    @property
    def on_driver(self) -> bool:
        """Whether statements run on the driver here (else through SQLAlchemy)."""
        return self.raw is not None or self.adapter is not None

    def _prepared(self, statement: Any, many: list[dict[str, Any]]
                  ) -> tuple[_Compiled, list[Any]] | None:
        compiled = None
        if many and self.on_driver:
            compiled = compile_plain(statement, self.dialect, tuple(many[0]))
        if compiled is None:
            return None
        template, slots = compiled.template, compiled.slots
        positional = []
        for row in many:
            values = list(template)
            for index, key, process in slots:
                value = row[key]
                values[index] = value if process is None else process(value)
            positional.append(tuple(values))
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
        if self.adapter is not None and len(positional) > 1:
            form = arrays_form(compiled)
            if form is not None:  # one statement, not one per row
                sql, arrays = form
                self.pending.append((sql, [tuple(
                    [row[index] for row in positional] if array else positional[0][index]
                    for index, array in enumerate(arrays))], False))
                return
        self.pending.append((compiled.sql, positional, False))

    @contextlib.contextmanager
    def deferring(self) -> Iterator[None]:
        """Result-less writes in the block wait for the next trip (``write``)."""
        self.defer = True
        try:
            yield
        finally:
            self.defer = False

    def later(self, sql: str) -> None:
        """A statement without parameters (a SAVEPOINT) that goes with the next trip."""
        self.pending.append((sql, [()], False))

    async def call(self, function: Callable[..., Any], *args: Any, rows: int = 1) -> Any:
        """``function(sqlite3_connection, *args)`` (SQLite only): in aiosqlite's thread,
        or right here when the connection may be used from this thread (``inline``). A
        trip to the thread wakes it and hands it the GIL, which costs more than the few
        statements of a trip; and inside our transactions (``BEGIN IMMEDIATE`` holds the
        write lock) a statement never waits for a lock. A trip of more than
        ``INLINE_ROWS`` parameter rows (a broadcast batch's inserts, a group commit's
        results) goes to the thread all the same: run here it would hold the loop for
        tens of milliseconds and the sends' pacer would lose its slots meanwhile."""
        raw = self.raw
        if getattr(raw, INLINE, False) and rows <= INLINE_ROWS:
            return function(raw._conn, *args)
        return await raw._execute(function, raw._conn, *args)

    async def lock(self, key: int) -> None:
        """Hold the transaction-scoped advisory lock ``key`` (PostgreSQL); as the
        transaction's first statement, it goes with its ``BEGIN`` in one trip."""
        if self.adapter is not None and not self.pending and await pg_driver.begin_with(
                self.connection, self.adapter, f"SELECT pg_advisory_xact_lock({int(key)})"):
            return
        await self.execute(_ADVISORY_LOCK, {"key": key})

    async def commit_with(self, sql: str) -> bool:
        """PostgreSQL: ``sql`` (constant, no parameters; may be empty) and the
        transaction's COMMIT in one trip (``pg_driver.commit_with``), after what was
        deferred if that is constant statements only (``later``); nothing may run in
        the transaction after it. False (nothing run) otherwise."""
        if self.adapter is None or not self._constant_pending():
            return False
        parts = [*(statement for statement, _, _ in self.pending), *([sql] if sql else [])]
        if not parts:
            return False
        done = await pg_driver.commit_with(self.connection, self.adapter, "; ".join(parts))
        if done:
            self.pending.clear()
        return done

    def _constant_pending(self) -> bool:
        return all(rows == [()] and "$" not in statement
                   for statement, rows, _ in self.pending)

    async def simple(self, sql: str) -> str:
        """PostgreSQL: ``sql`` (constant statements, no parameters) in one trip, with the
        constant statements deferred before it (``later``: a RELEASE) and the
        transaction's BEGIN if it has not begun; the status of its last statement."""
        if not self._constant_pending():
            await self.flush()
        parts, self.pending = [*(statement for statement, _, _ in self.pending), sql], []
        return await pg_driver.simple(self.connection, self.adapter, "; ".join(parts))

    async def flush(self) -> None:
        """Run the deferred statements now (one trip)."""
        if self.pending:
            await self._trip([])

    async def _trip(self, batch: list[tuple[str, list[Any], bool]]) -> tuple[list[Any], int]:
        import sqlite3

        batch, self.pending = [*self.pending, *batch], []
        if self.adapter is not None:
            return await pg_driver.run_batch(self.connection, self.adapter, batch, TABLES)
        try:
            return await self.call(run_batch_in_sqlite_thread, batch,
                                   rows=sum(len(params) for _, params, _ in batch))
        except sqlite3.Error as error:
            from sqlalchemy.exc import DBAPIError

            raise DBAPIError.instance(batch[-1][0], batch[-1][1], error,
                                      sqlite3.Error) from error

    async def linked_arrays(self, parent: Any, parent_columns: Columns, child: Any,
                            child_columns: Columns, link: str
                            ) -> tuple[list[int], list[int]] | None:
        """See ``insert_linked_columns`` (PostgreSQL, many rows): one
        ``statement_forms.linked_arrays`` statement, after what was deferred; None when
        it cannot be (nothing was run)."""
        insert_ = linked_arrays(self.dialect, parent, parent_columns, child, child_columns,
                                link)
        if insert_ is None:
            return None
        values = [*parent_columns.each.values(), *parent_columns.same.values(),
                  *insert_.parent_defaults.values(), *child_columns.each.values(),
                  *child_columns.same.values(), *insert_.child_defaults.values()]
        arrays = (*(value if process is None else each_processed(value, process) if array
                    else process(value) for value, process, array in zip(
                        values, insert_.processors, insert_.arrays, strict=True)),
                  *insert_.sequence)
        pending, self.pending = self.pending, []
        found, _ = await pg_driver.run_batch(
            self.connection, self.adapter, [*pending, (insert_.sql, [arrays], True)], TABLES)
        return [row[1] for row in found], [row[0] for row in found]

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


async def run_alone(engine: AsyncEngine, statement: Any, params: dict[str, Any]) -> Rows:
    """``statement`` as a unit of work by itself on PostgreSQL: compiled once, prepared
    on a pooled connection and run in the server's implicit transaction, one round trip
    (a session costs three: BEGIN, the statement, COMMIT). Only for module- or
    worker-level statements (the compiled forms are cached by statement)."""
    compiled = compile_plain(statement, engine.dialect, tuple(params))
    if compiled is None:
        raise ValueError("a statement run alone must compile to plain SQL")
    values = compiled.construct(params)
    binds = compiled.binds
    positional = tuple(binds[n](values[n]) if n in binds else values[n]
                       for n in compiled.names)
    found, count = await pg_driver.fetch_alone(engine, compiled.sql, positional)
    processors = compiled.results
    rows = [tuple(p(v) if p is not None else v for p, v in zip(processors, row, strict=True))
            for row in found] if any(processors) else [tuple(row) for row in found]
    return Rows(rows, compiled.keys, count)


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

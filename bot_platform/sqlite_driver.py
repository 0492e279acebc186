"""SQLite through aiosqlite's thread in one trip per statement.

SQLAlchemy's aiosqlite adapter opens a cursor, executes, fetches and closes it in separate
trips to aiosqlite's thread, each coming back through the event loop: measured here, 280
microseconds a statement, against 40 for the same SQLAlchemy work on plain ``sqlite3``. An
inbound event is a dozen statements, so those trips were most of its cost. This cursor
does the four steps in one trip (``bench/README.md`` has the before and after).

It needs aiosqlite's ``Connection._execute`` (run a function in its thread, present since
0.17); where that is missing, ``onehop_dbapi()`` returns None and the stock adapter is used.
"""

from __future__ import annotations

import collections
import sqlite3
from typing import Any

from sqlalchemy.dialects.sqlite.aiosqlite import (
    AsyncAdapt_aiosqlite_connection,
    AsyncAdapt_aiosqlite_cursor,
    AsyncAdapt_aiosqlite_dbapi,
)
from sqlalchemy.util import EMPTY_DICT
from sqlalchemy.util.concurrency import await_

from bot_platform.direct import INLINE, INLINE_ROWS


def _execute(connection: sqlite3.Connection, operation: str, parameters: Any,
             many: bool) -> tuple[Any, int, int | None, list[Any] | None]:
    """Runs in aiosqlite's thread: the whole statement, rows included."""
    cursor = connection.cursor()
    try:
        if many:
            cursor.executemany(operation, parameters)
        elif parameters is None:
            cursor.execute(operation)
        else:
            cursor.execute(operation, parameters)
        description = cursor.description
        rows = cursor.fetchall() if description else None
        return description, cursor.rowcount, cursor.lastrowid, rows
    finally:
        cursor.close()


async def _here(connection: sqlite3.Connection, operation: str, parameters: Any,
                many: bool) -> tuple[Any, int, int | None, list[Any] | None]:
    """``_execute`` in the loop's thread, as an awaitable: SQLAlchemy's async layer
    insists that a statement awaited something."""
    return _execute(connection, operation, parameters, many)


class OneHopCursor(AsyncAdapt_aiosqlite_cursor):
    """A client-side cursor whose statement, rows and metadata arrive in one trip."""

    __slots__ = ("_description", "_lastrowid", "_rowcount")

    def __init__(self, adapt_connection: Any) -> None:
        self._adapt_connection = adapt_connection
        self._connection = adapt_connection._connection
        self._cursor = None  # type: ignore[assignment]
        self._soft_closed_memoized = EMPTY_DICT
        self._rows = collections.deque()
        self._description: Any = None
        self._rowcount = -1
        self._lastrowid: int | None = None

    @property
    def description(self) -> Any:
        return self._description

    @property
    def rowcount(self) -> int:
        return self._rowcount

    @property
    def lastrowid(self) -> Any:
        return self._lastrowid

    def _run(self, operation: str, parameters: Any, many: bool) -> None:
        connection = self._connection
        try:
            if (getattr(connection, INLINE, False) and connection._conn.in_transaction
                    and not (many and len(parameters) > INLINE_ROWS)):
                # Inside our transaction (BEGIN IMMEDIATE holds the write lock) no
                # statement waits for a lock: run it here, as Direct does (a bulk
                # statement excepted: see Direct.call).
                result = await_(_here(connection._conn, operation, parameters, many))
            else:
                result = await_(connection._execute(_execute, connection._conn, operation,
                                                    parameters, many))
        except Exception as error:
            self._adapt_connection._handle_exception(error)
        self._description, self._rowcount, self._lastrowid, rows = result
        self._rows = collections.deque(rows or ())

    def execute(self, operation: Any, parameters: Any = None) -> Any:
        self._run(operation, parameters, many=False)

    def executemany(self, operation: Any, seq_of_parameters: Any) -> Any:
        self._run(operation, seq_of_parameters, many=True)

    async def _async_soft_close(self) -> None:
        return None  # nothing is open: the rows were fetched with the statement

    def close(self) -> None:
        self._rows.clear()


class OneHopConnection(AsyncAdapt_aiosqlite_connection):
    __slots__ = ()
    _cursor_cls = OneHopCursor


class OneHopDBAPI(AsyncAdapt_aiosqlite_dbapi):
    """The DBAPI module SQLAlchemy's aiosqlite dialect is given (``module=``)."""

    def connect(self, *arg: Any, **kw: Any) -> OneHopConnection:
        stock = super().connect(*arg, **kw)
        if kw.get("check_same_thread") is False:
            setattr(stock._connection, INLINE, True)  # Direct may use it from the loop
        return OneHopConnection(self, stock._connection)


def onehop_dbapi() -> OneHopDBAPI | None:
    import aiosqlite

    if not hasattr(aiosqlite.Connection, "_execute"):
        return None
    return OneHopDBAPI(aiosqlite, sqlite3)

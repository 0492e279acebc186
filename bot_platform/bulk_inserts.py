"""Ordered bulk inserts: many rows and their new ids in order, and rows linked to a
parent's new id (an outbox row and its message), in as few trips as each database
allows (``Direct`` on the driver, ``statement_forms`` on PostgreSQL)."""

from __future__ import annotations

from itertools import repeat
from typing import Any

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncSession

from bot_platform.direct import (
    Direct,
    compile_plain,
    direct,
    each_processed,
    run_batch_in_sqlite_thread,
)
from bot_platform.statement_forms import Columns, linked_pair

# On PostgreSQL a linked insert of a single row is one ``linked_pair`` statement; more
# rows go as one ``_linked_arrays`` statement (a column per array parameter).
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


async def insert_linked_columns(session: AsyncSession, parent: Any, parent_columns: Columns,
                                child: Any, child_columns: Columns, link: str, count: int
                                ) -> tuple[list[int], list[int]]:
    """Insert ``count`` parent rows, then one child row per parent whose ``link`` column
    is that parent's new id (an outbox row and its message); both lists of new ids, in
    order. Column by column: a batch builds no dict per row. On SQLite one trip of two
    ``executemany`` (``_insert_linked_in_sqlite_thread``); on PostgreSQL one statement
    (``linked_pair`` for one row, ``statement_forms.linked_arrays`` for more)."""
    if count == 0:
        return [], []
    parent_table = getattr(parent, "__table__", parent)
    child_table = getattr(child, "__table__", child)
    connection = await direct(session)
    if connection.adapter is not None and count == 1:
        parent_row = {key: values[0] for key, values in parent_columns.filled(1).items()}
        child_row = {key: values[0] for key, values in child_columns.filled(1).items()}
        row = (await connection.execute(linked_pair(
            parent_table, tuple(parent_row), child_table, (*child_row, link), link), {
            **{f"p_{key}": value for key, value in parent_row.items()},
            **{f"c_{key}": value for key, value in child_row.items()}})).rows[0]
        return [row[1]], [row[0]]
    if connection.adapter is not None:
        linked = await connection.linked_arrays(parent_table, parent_columns, child_table,
                                                child_columns, link)
        if linked is not None:
            return linked
    if connection.raw is not None:
        parent_keys = (*parent_columns.each, *parent_columns.same)
        child_keys = (*child_columns.each, *child_columns.same, link)
        first = compile_plain(_plain_insert(parent_table), connection.dialect, parent_keys)
        second = compile_plain(_plain_insert(child_table), connection.dialect, child_keys)
        if first is not None and second is not None:
            return await _linked_on_sqlite(
                connection, (first.sql, parent_table.name, _sources(first, parent_columns, count)),
                (second.sql, child_table.name, _sources(second, child_columns, count)),
                next(index for index, key, _ in second.slots if key == link), count)
    parent_ids = await insert_returning_ids(session, parent_table, _rows(parent_columns, count))
    child_ids = await insert_returning_ids(session, child_table, [
        {**row, link: parent_id} for row, parent_id in zip(
            _rows(child_columns, count), parent_ids, strict=True)])
    return parent_ids, child_ids


def _rows(columns: Columns, count: int) -> list[dict[str, Any]]:
    filled = columns.filled(count)
    return [dict(zip(filled, values, strict=True)) for values in zip(*filled.values(), strict=True)]


def _plain_insert(table: Any) -> Any:
    statement = _PLAIN.get(table)
    if statement is None:
        statement = _PLAIN[table] = insert(table)
    return statement


_PLAIN: dict[Any, Any] = {}  # per table: INSERT without RETURNING, built once


def _sources(compiled: Any, columns: Columns, count: int) -> list[Any]:
    """Per positional parameter of ``compiled``, its values for the ``count`` rows: a
    list, or one value repeated (a constant, processed once)."""
    sources: list[Any] = [repeat(value, count) for value in compiled.template]
    for index, key, process in compiled.slots:
        if key in columns.each:
            values = columns.each[key]
            sources[index] = values if process is None else each_processed(values, process)
        elif key in columns.same:
            value = columns.same[key]
            sources[index] = repeat(value if process is None else process(value), count)
    return sources


async def _linked_on_sqlite(connection: Direct, parent: tuple[str, str, list[Any]],
                            child: tuple[str, str, list[Any]], link: int, count: int
                            ) -> tuple[list[int], list[int]]:
    import sqlite3

    pending, connection.pending = connection.pending, []
    try:
        return await connection.call(_insert_linked_in_sqlite_thread, pending, parent, child,
                                     link, count, rows=2 * count)
    except sqlite3.Error as error:
        from sqlalchemy.exc import DBAPIError

        raise DBAPIError.instance(child[0], [], error, sqlite3.Error) from error


def _insert_linked_in_sqlite_thread(connection: Any, pending: list[Any],
                                    parent: tuple[str, str, list[Any]],
                                    child: tuple[str, str, list[Any]], link: int, count: int
                                    ) -> tuple[list[int], list[int]]:
    """Runs in aiosqlite's thread (or inline): the deferred statements, the parents, then
    the children with their parents' ids at position ``link``."""
    run_batch_in_sqlite_thread(connection, pending)
    cursor = connection.cursor()
    try:
        parents = _insert_many(cursor, *parent, count)
        sources = list(child[2])
        sources[link] = parents
        return parents, _insert_many(cursor, child[0], child[1], sources, count)
    finally:
        cursor.close()


def _insert_many(cursor: Any, sql: str, table: str, sources: list[Any], count: int
                 ) -> list[int]:
    """``count`` rows in one ``executemany`` (its loop in C, not one ``execute`` with
    ``RETURNING`` per row); their ids. Our transactions hold the write lock (``BEGIN
    IMMEDIATE``) and SQLite gives a new row the largest id so far plus one: the rows
    took the ids after the largest before them, in order, which the last id confirms."""
    import sqlite3

    before = cursor.execute(f"SELECT max(id) FROM {table}").fetchone()[0] or 0
    cursor.executemany(sql, zip(*sources, strict=True))
    last = cursor.execute("SELECT last_insert_rowid()").fetchone()[0]
    if last != before + count:
        raise sqlite3.DatabaseError(f"{table}: ids {before + 1}..{last} for {count} rows")
    return list(range(before + 1, last + 1))

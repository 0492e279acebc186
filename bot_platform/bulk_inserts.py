"""Ordered bulk inserts: many rows and their new ids in order, and rows linked to a
parent's new id (an outbox row and its message), in as few trips as each database
allows (``Direct`` on the driver, ``statement_forms`` on PostgreSQL)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncSession

from bot_platform.direct import direct
from bot_platform.statement_forms import linked_pair

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


async def insert_linked(session: AsyncSession, parent: Any, parent_rows: list[dict[str, Any]],
                        child: Any, child_rows: list[dict[str, Any]], link: str
                        ) -> tuple[list[int], list[int]]:
    """Insert parent rows, then one child row per parent whose ``link`` column is that
    parent's new id (an outbox row and its message); both lists of new ids, in order.
    On SQLite both inserts are one trip to the database; on PostgreSQL one statement
    (``linked_pair`` for one row, ``_linked_arrays`` for more)."""
    parent_table = getattr(parent, "__table__", parent)
    child_table = getattr(child, "__table__", child)
    connection = await direct(session)
    if connection.adapter is not None and len(parent_rows) == len(child_rows) == 1:
        row = (await connection.execute(linked_pair(
            parent_table, tuple(parent_rows[0]), child_table, tuple(child_rows[0]), link), {
            **{f"p_{key}": value for key, value in parent_rows[0].items()},
            **{f"c_{key}": value for key, value in child_rows[0].items()}})).rows[0]
        return [row[1]], [row[0]]
    if connection.adapter is not None and len(parent_rows) == len(child_rows) > 1:
        linked = await connection.linked_arrays(parent_table, parent_rows, child_table,
                                                child_rows, link)
        if linked is not None:
            return linked
    if connection.raw is not None and parent_rows:
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

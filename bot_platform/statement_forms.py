"""Statement forms whose text does not depend on how many rows or ids they carry, so
PostgreSQL keeps them prepared and runs a batch in one statement: id lists as one
parameter (``in_ids``), many parameter rows as ``unnest`` arrays (``arrays_form``), a row
and its child in one statement (``linked_pair``, ``linked_arrays``). ``direct.py`` runs
them; this module only builds them."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import BigInteger, Boolean, String, TypeDecorator, bindparam, insert, select
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.visitors import InternalTraversal

# The tables each compiled statement names (PostgreSQL merges writes on disjoint tables).
TABLES: dict[str, frozenset[str]] = {}


class IdList(TypeDecorator[list[int]]):
    """A list of ids as one bind parameter: a PostgreSQL ``bigint[]``, JSON text on
    SQLite (read back by ``json_each``)."""

    impl = String
    cache_ok = True

    def load_dialect_impl(self, dialect: Any) -> Any:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(ARRAY(BigInteger))
        return dialect.type_descriptor(String())

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        if value is None:
            return None
        if dialect.name == "postgresql":
            return [int(v) for v in value]
        return "[" + ",".join(str(int(v)) for v in value) + "]"


class in_ids(ColumnElement[bool]):
    """``column IN ids`` with the ids as one bind parameter ``name`` (an ``IdList``):
    ``column = ANY($1)`` on PostgreSQL, ``column IN (SELECT value FROM json_each(?))``
    on SQLite. Unlike an expanding ``IN``, the statement's text does not depend on how
    many ids there are, so ``Direct`` runs it and PostgreSQL keeps it prepared (a list
    of 50 ids was 50 parameters: prepared, run and closed, three round trips). On
    PostgreSQL ``= ANY`` and not ``IN (SELECT unnest(...))``: with statistics that
    believe few rows match, the planner joined the latter in a nested loop (the fence of
    a batch: 15,000 comparisons, 10-17 ms), where ``= ANY`` is an index condition."""

    type = Boolean()
    inherit_cache = True
    _traverse_internals = [("column", InternalTraversal.dp_clauseelement),
                           ("ids", InternalTraversal.dp_clauseelement)]

    def __init__(self, column: Any, name: str) -> None:
        self.column = column
        self.ids = bindparam(name, type_=IdList())

    def self_group(self, against: Any = None) -> Any:
        return self  # a comparison already: no "= 1" where booleans are integers


@compiles(in_ids)
def _in_ids_sqlite(element: in_ids, compiler: Any, **kw: Any) -> str:
    return (f"({compiler.process(element.column, **kw)} IN "
            f"(SELECT value FROM json_each({compiler.process(element.ids, **kw)})))")


@compiles(in_ids, "postgresql")
def _in_ids_postgresql(element: in_ids, compiler: Any, **kw: Any) -> str:
    return (f"({compiler.process(element.column, **kw)} = "
            f"ANY({compiler.process(element.ids, **kw)}))")


# The bind casts asyncpg's compiler writes (``$3::VARCHAR``), longest spellings first.
_CAST = re.compile(r"\$(\d+)::(TIMESTAMP WITHOUT TIME ZONE|TIMESTAMP WITH TIME ZONE|"
                   r"DOUBLE PRECISION|VARCHAR|BIGINT|INTEGER|SMALLINT|BOOLEAN|JSONB|JSON|TEXT|"
                   r"FLOAT|NUMERIC)")
_ARRAYS: dict[str, tuple[str, tuple[bool, ...]] | None] = {}


def arrays_form(compiled: Any) -> tuple[str, tuple[bool, ...]] | None:
    """A PostgreSQL ``INSERT ... VALUES``, ``UPDATE ... WHERE`` or ``DELETE ... WHERE``
    for many parameter rows as one statement (None when its shape is not one of those):
    each parameter a row fills becomes an array parameter of the same number, ``unnest``
    turns them back into rows (``INSERT ... SELECT``, ``UPDATE ... FROM``, ``DELETE ...
    USING``), the statement's constants stay single values. Returns the SQL and, per
    parameter, whether it is an array. The server then runs one statement where an
    ``executemany`` ran it once per row (about 60 us of server time each).

    Only for rows that each touch their own target rows (a flow state, a job, a
    subscriber's timers of one flow): with ``UPDATE ... FROM`` a target row matched by
    two parameter rows is updated once, where an ``executemany`` applies both."""
    sql = compiled.sql
    if sql in _ARRAYS:
        return _ARRAYS[sql]
    result = None
    filled = {index for index, _, _ in compiled.slots}
    casts = {int(found.group(1)) - 1: found.group(2) for found in _CAST.finditer(sql)}
    body = re.sub(r" RETURNING [\w., ]+$", "", sql)
    if (filled and all(index in casts for index in filled)
            and len(_CAST.findall(body)) == len(compiled.names) and "'" not in body
            and "[]" not in body):  # an array parameter already: not a column's value
        arrays = ", ".join(
            f"${index + 1}::{'TEXT' if casts[index].startswith('JSON') else casts[index]}[]"
            for index in sorted(filled))
        source = (f"unnest({arrays}) AS u("
                  f"{', '.join(f'p{index + 1}' for index in sorted(filled))})")
        body = _CAST.sub(lambda found: (
            f"u.p{found.group(1)}::{found.group(2)}" if int(found.group(1)) - 1 in filled
            else found.group(0)), body)
        head, _, values = body.partition(" VALUES ")
        if body.startswith("INSERT INTO ") and values.startswith("(") and values.endswith(
                ")") and ") VALUES (" not in values:
            result = f"{head} SELECT {values[1:-1]} FROM {source}"
        elif body.startswith("UPDATE ") and body.count(" WHERE ") == 1 and " FROM " not in body:
            target, where = body.split(" WHERE ")
            result = f"{target} FROM {source} WHERE {where}"
        elif body.startswith("DELETE FROM ") and body.count(" WHERE ") == 1 and (
                " USING " not in body):
            target, where = body.split(" WHERE ")
            result = f"{target} USING {source} WHERE {where}"
    found = _ARRAYS[sql] = (result, tuple(index in filled for index in range(
        len(compiled.names)))) if result is not None else None
    if found is not None and sql in TABLES:
        TABLES[found[0]] = TABLES[sql]
    return found


_LINKED_PAIRS: dict[tuple[Any, ...], Any] = {}


def parent_insert(parent: Any, parent_keys: tuple[str, ...]) -> Any:
    """The parent row's insert as a ``WITH`` clause returning its new id (binds
    ``p_<column>``), for a child's insert to link to."""
    return insert(parent).values({
        name: bindparam(f"p_{name}") for name in parent_keys}).returning(
        parent.c.id).cte("linked_parent")


def linked_pair(parent: Any, parent_keys: tuple[str, ...], child: Any,
                 child_keys: tuple[str, ...], link: str) -> Any:
    """One parent row and its child in one statement (PostgreSQL): the parent's insert
    in a ``WITH`` clause, the child's link its new id; returns the child's id and its
    parent's. Bind names are prefixed (``p_``, ``c_``): both tables share column names."""
    key = (parent, parent_keys, child, child_keys, link)
    statement = _LINKED_PAIRS.get(key)
    if statement is None:
        inserted = parent_insert(parent, parent_keys)
        statement = insert(child).values({
            **{name: bindparam(f"c_{name}") for name in child_keys if name != link},
            link: select(inserted.c.id).scalar_subquery()}).returning(
            child.c.id, child.c[link])
        _LINKED_PAIRS[key] = statement
    return statement


@dataclass(frozen=True, slots=True)
class Columns:
    """Rows given column by column: ``each`` one value per row; ``same`` the values every
    row has (a batch's moment, status, broadcast), bound and processed once."""

    each: dict[str, list[Any]]
    same: dict[str, Any] = field(default_factory=dict)

    def filled(self, count: int) -> dict[str, list[Any]]:
        return {**self.each, **{key: [value] * count for key, value in self.same.items()}}


@dataclass(frozen=True, slots=True)
class ArraysInsert:
    sql: str
    processors: tuple[Callable[[Any], Any] | None, ...]  # per column: the bind processor
    arrays: tuple[bool, ...]  # per column: an array (else one value for every row)
    parent_defaults: dict[str, Any]  # constant Python-side defaults of columns not given
    child_defaults: dict[str, Any]
    sequence: tuple[str, str]  # the parents' table and id column


_LINKED_ARRAYS: dict[tuple[Any, ...], ArraysInsert | None] = {}


def _constant_defaults(table: Any, given: tuple[str, ...]) -> dict[str, Any] | None:
    """The Python-side defaults of the columns not ``given`` (None: one is not a
    constant, the statement needs SQLAlchemy's execution)."""
    defaults: dict[str, Any] = {}
    for column in table.columns:
        if column.key in given or column.default is None:
            continue
        if not column.default.is_scalar:
            return None
        defaults[column.key] = column.default.arg
    return defaults


def linked_arrays(dialect: Any, parent: Any, parent_columns: Columns, child: Any,
                   child_columns: Columns, link: str) -> ArraysInsert | None:
    """Many parent rows and a child row each in one statement (PostgreSQL), its text
    the same for any number of rows (so it stays prepared): each column's values one
    array parameter, ``unnest`` turns them back into rows; a value all rows share
    (``Columns.same``, a constant default) is one parameter (asyncpg checks every
    element of an array it encodes); the parents' ids are drawn from their sequence in
    row order, then both inserts (in row order) take them; returns (child id, parent
    id) in row order. JSON travels as text. The parameters: the parent's columns, each
    then same then defaults, then the child's likewise (``ArraysInsert``)."""
    parent_each, parent_same = tuple(parent_columns.each), tuple(parent_columns.same)
    child_each = tuple(name for name in child_columns.each if name != link)
    child_same = tuple(child_columns.same)
    key = (dialect.name, parent, parent_each, parent_same, child, child_each, child_same,
           link)
    if key in _LINKED_ARRAYS:
        return _LINKED_ARRAYS[key]
    parent_defaults = _constant_defaults(parent, (*parent_each, *parent_same, "id"))
    child_defaults = _constant_defaults(child, (*child_each, *child_same, link, "id"))
    if parent_defaults is None or child_defaults is None or not (parent_each or child_each):
        _LINKED_ARRAYS[key] = None
        return None
    parent_keys = (*parent_each, *parent_same, *parent_defaults)
    child_keys = (*child_each, *child_same, *child_defaults)
    columns = [parent.c[name] for name in parent_keys] + [child.c[name] for name in child_keys]
    is_array = [n < len(parent_each) for n in range(len(parent_keys))] + [
        n < len(child_each) for n in range(len(child_keys))]
    names = [f"p{n}" for n in range(len(parent_keys))] + [
        f"c{n}" for n in range(len(child_keys))]
    arrays, processors, values = [], [], []
    for number, (column, name, array) in enumerate(zip(columns, names, is_array, strict=True),
                                                   start=1):
        type_sql = column.type.compile(dialect=dialect)
        is_json = type_sql in ("JSON", "JSONB")
        processors.append(column.type._cached_bind_processor(dialect))
        if array:
            arrays.append(f"${number}::{'TEXT' if is_json else type_sql}[]")
            values.append(f"{name}::{type_sql}" if is_json else name)
        else:
            values.append(f"${number}::TEXT::{type_sql}" if is_json
                          else f"${number}::{type_sql}")
    names = [name for name, array in zip(names, is_array, strict=True) if array]
    parent_values = values[:len(parent_keys)]
    child_values = values[len(parent_keys):]
    # The sequence's name comes as two more parameters: the statement holds no quotes,
    # so the deferred writes before it can ride in it (``pg_driver.merge_writes``).
    number = len(columns)
    # Looked up once per statement (an init plan), not once per row.
    sequence = (f"(SELECT pg_get_serial_sequence(${number + 1}::TEXT, ${number + 2}::TEXT)"
                f"::regclass)")
    sql = (
        f"WITH input AS MATERIALIZED (SELECT nextval({sequence}) AS link_id, t.* FROM ("
        f"SELECT * FROM unnest({', '.join(arrays)}) WITH ORDINALITY "
        f"AS u({', '.join(names)}, n) ORDER BY n) AS t), "
        f"parent AS (INSERT INTO {parent.name} (id, {', '.join(parent_keys)}) "
        f"SELECT link_id, {', '.join(parent_values)} FROM input ORDER BY n), "
        f"child AS (INSERT INTO {child.name} ({', '.join([*child_keys, link])}) "
        f"SELECT {', '.join([*child_values, 'link_id'])} FROM input ORDER BY n "
        f"RETURNING id, {link}) "
        f"SELECT child.id, child.{link} FROM child JOIN input ON input.link_id = "
        f"child.{link} ORDER BY input.n")
    found = _LINKED_ARRAYS[key] = ArraysInsert(
        sql, tuple(processors), tuple(is_array), parent_defaults, child_defaults,
        (parent.name, parent.c.id.name))
    TABLES[sql] = frozenset({parent.name, child.name})
    return found

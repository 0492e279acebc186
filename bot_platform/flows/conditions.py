"""Conditions, and the one meaning of an attribute test that flows and segments share.

A flow's ``when`` is evaluated here in Python; a segment's ``attribute`` filter is
compiled to SQL here. Both go through the same definitions, and a property test runs
random attributes through both and compares (``tests/test_segments.py``):

- a *number* is an int or float, or text of ASCII digits with an optional sign and one
  decimal point or comma (``"5"``, ``"-2,5"``): a button's answer ``"9"`` is the number 9;
- ``eq``/``ne``: numbers compare as numbers; anything else only with its own kind (text
  with text, true/false with booleans), so ``true`` never equals ``1``;
- ``gt``/``gte``/``lt``/``lte``: both sides numbers, otherwise false;
- ``in``/``not_in``: ``eq`` against any item of a list;
- ``contains``: text inside text, case-insensitive (Python's ``str.lower``; PostgreSQL's
  ``lower()``, SQLite gets the Python one registered as ``botp_lower``);
- ``exists``: the attribute is set and not null (``value: false``: it is not).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Protocol

from pydantic import BeforeValidator, Field
from sqlalchemy import JSON, Float, String, and_, case, cast, false, func, not_, or_, true
from sqlalchemy.sql import ColumnElement

from bot_platform.flows.base import Spec, did_you_mean

Op = Literal["eq", "ne", "gt", "gte", "lt", "lte", "in", "not_in", "exists", "contains"]
OPS: tuple[str, ...] = Op.__args__
COMPARISONS = ("gt", "gte", "lt", "lte")
# Words people write for an op, for the suggestion in the error.
_OP_SYNONYMS = {
    "bigger": "gt", "greater": "gt", "greater_than": "gt", "more": "gt", "above": "gt",
    "over": "gt", ">": "gt", "gt_eq": "gte", "ge": "gte", ">=": "gte", "at_least": "gte",
    "smaller": "lt", "less": "lt", "less_than": "lt", "fewer": "lt", "below": "lt",
    "under": "lt", "<": "lt", "le": "lte", "lt_eq": "lte", "<=": "lte", "at_most": "lte",
    "=": "eq", "==": "eq", "equals": "eq", "equal": "eq", "is": "eq", "!=": "ne",
    "not_eq": "ne", "neq": "ne", "not_equal": "ne", "is_not": "ne", "one_of": "in",
    "not_one_of": "not_in", "nin": "not_in", "has": "contains", "includes": "contains",
    "exist": "exists", "present": "exists", "set": "exists",
}
SQLITE_LOWER = "botp_lower"  # Python's str.lower, registered on every SQLite connection


def _check_op(value: Any) -> Any:
    if isinstance(value, str) and value in OPS:
        return value
    raise ValueError(f"unknown op {value!r}{did_you_mean(value, OPS, _OP_SYNONYMS)}; "
                     f"ops: {', '.join(OPS)}")


CheckedOp = Annotated[Op, BeforeValidator(_check_op)]


# ---- the attribute semantics, in Python ------------------------------------------------

_NUMBER_TEXT = re.compile(r"[+-]?[0-9]+(?:[.,][0-9]+)?")


def as_number(value: Any) -> float | None:
    """The number a value stands for (see the module's docstring), or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and _NUMBER_TEXT.fullmatch(value):
        return float(value.replace(",", "."))
    return None


def same(actual: Any, expected: Any) -> bool:
    """``eq``: numbers as numbers, everything else only with its own kind."""
    number = as_number(expected)
    if number is not None:
        return as_number(actual) == number
    if isinstance(expected, bool):
        return isinstance(actual, bool) and actual is expected
    if isinstance(expected, str):
        return isinstance(actual, str) and actual == expected
    return actual == expected  # None, or a list/mapping a flow compares with


def items(expected: Any) -> list[Any]:
    """The list ``in``/``not_in`` look in (a single value is a list of one)."""
    if expected is None:
        return []
    return list(expected) if isinstance(expected, list | tuple) else [expected]


def attribute_holds(op: str, actual: Any, expected: Any) -> bool:
    """Whether ``actual <op> expected`` holds; ``actual`` is None when unset."""
    if op == "exists":
        return (actual is not None) == (expected is not False)
    if op in ("in", "not_in"):
        found = any(same(actual, item) for item in items(expected))
        return found if op == "in" else not found
    if op == "contains":
        return isinstance(actual, str) and str(expected).lower() in actual.lower()
    if op in ("eq", "ne"):
        return same(actual, expected) if op == "eq" else not same(actual, expected)
    left, right = as_number(actual), as_number(expected)
    if left is None or right is None:
        return False
    return {"gt": left > right, "gte": left >= right, "lt": left < right,
            "lte": left <= right}[op]


# ---- the same semantics, in SQL --------------------------------------------------------


def register_sqlite_functions(dbapi_connection: Any) -> None:
    """Give a SQLite connection the functions compiled conditions call (SQLite's own
    ``lower()`` knows only ASCII)."""
    dbapi_connection.create_function(
        SQLITE_LOWER, 1, lambda v: v.lower() if isinstance(v, str) else v, deterministic=True)


def _number_text(text: Any, dialect: str) -> ColumnElement[bool]:
    """SQL for "this text is a number" (``_NUMBER_TEXT``)."""
    if dialect == "postgresql":
        return text.op("~")(r"^[+-]?[0-9]+([.,][0-9]+)?$")
    body = case((func.substr(text, 1, 1).in_(("+", "-")), func.substr(text, 2)), else_=text)
    digits = func.replace(func.replace(body, ",", ""), ".", "")
    return and_(digits != "", digits.op("NOT GLOB")("*[^0-9]*"),
                func.length(body) - func.length(digits) <= 1,
                body.op("GLOB")("[0-9]*"), body.op("GLOB")("*[0-9]"))


def attribute_parts(column: Any, name: str, dialect: str) -> tuple[Any, Any, Any]:
    """(JSON kind, value as text, value as a number) of attribute ``name`` of a JSON
    column. Kinds are normalized to: number, string, boolean, null, array, object (None when
    absent);
    the number is set for numbers and for text that is a number."""
    if dialect == "postgresql":
        kind = func.json_typeof(column.op("->", return_type=JSON)(name))
        text = column.op("->>", return_type=String)(name)
        numeric = or_(kind == "number", and_(kind == "string", _number_text(text, dialect)))
        number = cast(case((numeric, func.replace(text, ",", ".")), else_=None), Float)
        return kind, text, number
    path = f'$."{name}"'
    raw_kind = func.json_type(column, path)
    kind = case((raw_kind.in_(("integer", "real")), "number"), (raw_kind == "text", "string"),
                (raw_kind.in_(("true", "false")), "boolean"),
                else_=raw_kind)  # null, array, object; None when absent
    raw = func.json_extract(column, path)
    text = case((raw_kind == "true", "true"), (raw_kind == "false", "false"),
                else_=cast(raw, String))
    number = case((raw_kind.in_(("integer", "real")), cast(raw, Float)),
                  (and_(raw_kind == "text", _number_text(text, dialect)),
                   cast(func.replace(text, ",", "."), Float)), else_=None)
    return kind, text, number


def definite(condition: ColumnElement[bool]) -> ColumnElement[bool]:
    """True or false, never SQL's unknown (which NOT would keep unknown)."""
    return case((condition, true()), else_=false())


def _same_sql(kind: Any, text: Any, number: Any, expected: Any) -> ColumnElement[bool]:
    wanted = as_number(expected)
    if wanted is not None:
        return definite(number == wanted)
    if isinstance(expected, bool):
        return definite(and_(kind == "boolean", text == ("true" if expected else "false")))
    if isinstance(expected, str):
        return definite(and_(kind == "string", text == expected))
    return false()  # segments accept no other kind of value


def attribute_sql(op: str, expected: Any, parts: tuple[Any, Any, Any],
                  dialect: str) -> ColumnElement[bool]:
    """``attribute_holds`` as a SQL boolean over ``attribute_parts`` (never unknown)."""
    kind, text, number = parts
    is_set = definite(and_(kind.is_not(None), kind != "null"))
    if op == "exists":
        return is_set if expected is not False else not_(is_set)
    if op in ("in", "not_in"):
        found = or_(false(), *[_same_sql(kind, text, number, v) for v in items(expected)])
        return definite(found) if op == "in" else not_(definite(found))
    if op == "contains":
        lower = func.lower if dialect == "postgresql" else getattr(func, SQLITE_LOWER)
        needle = str(expected).lower()
        position = (func.strpos(lower(text), needle) if dialect == "postgresql"
                    else func.instr(lower(text), needle))
        return definite(and_(kind == "string", position > 0))
    if op in ("eq", "ne"):
        found = _same_sql(kind, text, number, expected)
        return found if op == "eq" else not_(found)
    limit = as_number(expected)
    if limit is None:
        return false()
    compare = {"gt": number > limit, "gte": number >= limit, "lt": number < limit,
               "lte": number <= limit}[op]
    return definite(compare)


# ---- flow conditions -------------------------------------------------------------------


class TagCondition(Spec):
    """True when the subscriber has ``tag``."""

    tag: str


class AttributeCondition(Spec):
    """Compares a subscriber attribute (or ``locale``/``channel``) with ``value``."""

    attribute: str
    op: CheckedOp = "eq"
    value: Any = None


class AllCondition(Spec):
    all: list[ConditionField]


class AnyCondition(Spec):
    any: list[ConditionField]


class NotCondition(Spec):
    not_: ConditionField = Field(alias="not")


Condition = TagCondition | AttributeCondition | AllCondition | AnyCondition | NotCondition
_CONDITIONS: dict[str, type[Spec]] = {"tag": TagCondition, "attribute": AttributeCondition,
                                      "all": AllCondition, "any": AnyCondition,
                                      "not": NotCondition}


def _parse_condition(value: Any) -> Any:
    """Pick the condition's kind by its key, so a mistake gives one message about that
    kind (not one per kind of the union)."""
    if isinstance(value, Spec):
        return value
    kinds = [key for key in value if key in _CONDITIONS] if isinstance(value, dict) else []
    if len(kinds) != 1:
        keys = list(value) if isinstance(value, dict) else []
        hint = next((did_you_mean(k, _CONDITIONS) for k in keys if did_you_mean(
            k, _CONDITIONS)), "")
        raise ValueError(f"a condition has one of the keys {', '.join(_CONDITIONS)} "
                         f"(got {', '.join(map(str, keys)) or repr(value)}){hint}")
    return _CONDITIONS[kinds[0]].model_validate(value)


ConditionField = Annotated[Any, BeforeValidator(_parse_condition)]
for _model in (AllCondition, AnyCondition, NotCondition):
    _model.model_rebuild()


class Facts(Protocol):
    """What a condition reads: tags, and attributes by name (a flow's ``Turn``)."""

    tags: set[str]

    def lookup(self, name: str) -> Any: ...


def condition_holds(condition: Condition, facts: Facts) -> bool:
    """Evaluate a flow condition against the subscriber's tags and attributes."""
    if isinstance(condition, TagCondition):
        return condition.tag in facts.tags
    if isinstance(condition, AllCondition):
        return all(condition_holds(c, facts) for c in condition.all)
    if isinstance(condition, AnyCondition):
        return any(condition_holds(c, facts) for c in condition.any)
    if isinstance(condition, NotCondition):
        return not condition_holds(condition.not_, facts)
    assert isinstance(condition, AttributeCondition)
    return attribute_holds(condition.op, facts.lookup(condition.attribute), condition.value)

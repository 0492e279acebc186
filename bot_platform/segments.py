"""Segments: a JSON filter language over subscribers, compiled to SQLAlchemy expressions
(never string SQL), with a pure-Python reference evaluation the tests compare against.

    {"all": [{"tag": "vip"},
             {"attribute": "age", "op": "gte", "value": 18},
             {"channel": "telegram"}, {"locale": "uk"}, {"status": "subscribed"},
             {"last_active": {"within_days": 30}},
             {"created": {"before_days": 7}},
             {"event": {"name": "order_placed", "min_count": 2, "within_days": 90}},
             {"rfm": "champions"},
             {"not": {"any": [{"tag": "blocked"}, {"tag": "test"}]}}]}

A filter is bounded (``MAX_DEPTH`` levels, ``MAX_CONDITIONS`` conditions, texts that fit
their columns, numbers a database compares), so compiling one stays cheap enough for the
event loop that API, webhooks and delivery share.

RFM comes from ``order_placed`` events (``data.total`` is the money): recency = days since
the contact's last order, frequency = orders, monetary = their sum.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    model_validator,
)
from pydantic_core import PydanticCustomError
from sqlalchemy import (
    JSON,
    Float,
    String,
    and_,
    case,
    cast,
    false,
    func,
    not_,
    or_,
    select,
    true,
)
from sqlalchemy.sql import ColumnElement

from bot_platform.models import CustomerEvent, Subscriber, SubscriberTag
from bot_platform.text import INT64_MAX, INT64_MIN, text

MAX_DEPTH = 8  # levels of all/any/not
MAX_CONDITIONS = 100  # tests on subscribers (not all/any/not); an RFM group as RFM_WEIGHT
RFM_WEIGHT = 5  # an RFM group compiles to several subqueries
MAX_DAYS = 36_500  # a hundred years back is "ever"
MAX_COUNT = 1_000_000_000


class _Filter(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class TagFilter(_Filter):
    tag: text(64)


Op = Literal["eq", "ne", "gt", "gte", "lt", "lte", "exists", "contains"]


class AttributeFilter(_Filter):
    """``eq``/``ne`` compare like with like (a number with numbers, text with text, true/
    false with booleans); ``gt``/``gte``/``lt``/``lte`` need a number and never match a
    non-number; ``contains`` looks for text inside text (case-sensitive); ``exists`` is
    true when the attribute is set (``value: false``: when it is not)."""

    attribute: str = Field(pattern=r"^[A-Za-z0-9_]{1,64}$")
    op: Op = "eq"
    value: text(1024) | float | int | bool | None = None

    @model_validator(mode="after")
    def _value_fits_op(self) -> AttributeFilter:
        if isinstance(self.value, float) and not math.isfinite(self.value):
            raise ValueError("the value must be a finite number")
        if isinstance(self.value, int) and not isinstance(self.value, bool) and not (
                INT64_MIN <= self.value <= INT64_MAX):
            raise ValueError("the value is out of the 64-bit integer range")
        if self.op in ("gt", "gte", "lt", "lte") and (
                isinstance(self.value, bool) or not isinstance(self.value, int | float)):
            raise ValueError(f"op {self.op} needs a number")
        if self.op in ("eq", "ne", "contains") and self.value is None:
            raise ValueError(f"op {self.op} needs a value")
        return self


class ChannelFilter(_Filter):
    channel: text(32)


class LocaleFilter(_Filter):
    locale: text(16)


class StatusFilter(_Filter):
    status: Literal["subscribed", "unsubscribed"]


class DaysRange(_Filter):
    within_days: int | None = Field(default=None, ge=0, le=MAX_DAYS)  # at most this long ago
    before_days: int | None = Field(default=None, ge=0, le=MAX_DAYS)  # at least this long

    @model_validator(mode="after")
    def _one(self) -> DaysRange:
        if self.within_days is None and self.before_days is None:
            raise ValueError("give within_days or before_days")
        return self


class LastActiveFilter(_Filter):
    last_active: DaysRange


class CreatedFilter(_Filter):
    created: DaysRange


class EventSpec(_Filter):
    name: text(64)
    min_count: int = Field(default=1, ge=0, le=MAX_COUNT)
    max_count: int | None = Field(default=None, ge=0, le=MAX_COUNT)
    within_days: int | None = Field(default=None, ge=0, le=MAX_DAYS)


class EventFilter(_Filter):
    event: EventSpec


RfmGroup = Literal["champions", "loyal", "at_risk", "lost", "new", "none"]


class RfmFilter(_Filter):
    rfm: RfmGroup


class AllFilter(_Filter):
    all: list[AnyCondition] = Field(max_length=100)


class AnyFilter(_Filter):
    any: list[AnyCondition] = Field(max_length=100)


class NotFilter(_Filter):
    not_: AnyCondition = Field(alias="not")


_FILTERS: dict[str, type[_Filter]] = {
    "tag": TagFilter, "attribute": AttributeFilter, "channel": ChannelFilter,
    "locale": LocaleFilter, "status": StatusFilter, "last_active": LastActiveFilter,
    "created": CreatedFilter, "event": EventFilter, "rfm": RfmFilter, "all": AllFilter,
    "any": AnyFilter, "not": NotFilter,
}


def _filter_kind(value: Any) -> str | None:
    """Which filter a mapping is, by its defining key (so errors point inside it)."""
    if isinstance(value, _Filter):
        return type(value).__name__
    if isinstance(value, dict):
        for key, model in _FILTERS.items():
            if key in value:
                return model.__name__
    return None


AnyCondition = Annotated[
    Annotated[TagFilter, Tag("TagFilter")] | Annotated[AttributeFilter, Tag("AttributeFilter")]
    | Annotated[ChannelFilter, Tag("ChannelFilter")] | Annotated[LocaleFilter, Tag("LocaleFilter")]
    | Annotated[StatusFilter, Tag("StatusFilter")]
    | Annotated[LastActiveFilter, Tag("LastActiveFilter")]
    | Annotated[CreatedFilter, Tag("CreatedFilter")] | Annotated[EventFilter, Tag("EventFilter")]
    | Annotated[RfmFilter, Tag("RfmFilter")] | Annotated[AllFilter, Tag("AllFilter")]
    | Annotated[AnyFilter, Tag("AnyFilter")] | Annotated[NotFilter, Tag("NotFilter")],
    Discriminator(_filter_kind, custom_error_type="invalid_filter",
                  custom_error_message="a filter is a mapping with one of the keys: "
                                       + ", ".join(_FILTERS)),
]


def _bounded(value: Any) -> Any:
    """Refuse a filter too deep or too large before validating it (a cheap walk that
    stops at the first bound), so no request can make compiling it expensive."""
    conditions = 0
    pending: list[tuple[Any, int]] = [(value, 1)]
    while pending:
        node, depth = pending.pop()
        if isinstance(node, list):
            pending.extend((item, depth) for item in node)
            continue
        if not isinstance(node, dict):
            continue
        nested = [key for key in ("all", "any", "not") if key in node]
        conditions += 0 if nested else RFM_WEIGHT if "rfm" in node else 1
        if conditions > MAX_CONDITIONS:
            raise PydanticCustomError(
                "filter_too_large",
                f"a filter has at most {{limit}} conditions (an rfm one counts {RFM_WEIGHT})",
                {"limit": MAX_CONDITIONS})
        for key in nested:
            if depth > MAX_DEPTH:
                raise PydanticCustomError(
                    "filter_too_deep", "a filter nests all/any/not at most {limit} deep",
                    {"limit": MAX_DEPTH})
            pending.append((node[key], depth + 1))
    return value


# A whole filter: bounded, then validated.
Filter = Annotated[AnyCondition, BeforeValidator(_bounded)]

for _model in (AllFilter, AnyFilter, NotFilter):
    _model.model_rebuild()


class Segment(BaseModel):
    """A whole filter (the body of a segment)."""

    filter: Filter


# ---- RFM -------------------------------------------------------------------------------

# Named groups by (recency days, frequency): checked in this order.
RFM_GROUPS: list[tuple[str, int | None, int | None, int, int | None]] = [
    # name,      recency >=, recency <=, frequency >=, frequency <=
    ("champions", None, 30, 3, None),
    ("new", None, 30, 1, 1),
    ("lost", 181, None, 1, None),
    ("at_risk", 91, 180, 2, None),
    ("loyal", None, 90, 2, None),
]


def rfm_group(recency_days: float | None, frequency: int) -> str:
    """The named group of a contact; "none" when no group fits (or no orders)."""
    if frequency == 0 or recency_days is None:
        return "none"
    for name, r_min, r_max, f_min, f_max in RFM_GROUPS:
        if r_min is not None and recency_days < r_min:
            continue
        if r_max is not None and recency_days > r_max:
            continue
        if frequency < f_min or (f_max is not None and frequency > f_max):
            continue
        return name
    return "none"


# ---- compiling to SQL ------------------------------------------------------------------


def _days_ago(now: datetime, days: int) -> datetime:
    return now - timedelta(days=days)


def _range(column: Any, spec: DaysRange, now: datetime) -> ColumnElement[bool]:
    parts = []
    if spec.within_days is not None:
        parts.append(column >= _days_ago(now, spec.within_days))
    if spec.before_days is not None:
        parts.append(column <= _days_ago(now, spec.before_days))
    return and_(column.is_not(None), *parts)


def _json_parts(name: str, dialect: str) -> tuple[Any, Any, Any]:
    """(JSON type name, value as text, value as a number) of one attribute, per dialect.
    Type names are normalized to: number, string, boolean, null (None when absent)."""
    if dialect == "postgresql":
        raw_kind = func.json_typeof(Subscriber.attributes.op("->", return_type=JSON)(name))
        kind = raw_kind
        text = Subscriber.attributes.op("->>", return_type=String)(name)
        number = cast(case((raw_kind == "number", text), else_=None), Float)
        return kind, text, number
    path = f'$."{name}"'
    raw_kind = func.json_type(Subscriber.attributes, path)
    kind = case((raw_kind.in_(("integer", "real")), "number"), (raw_kind == "text", "string"),
                (raw_kind.in_(("true", "false")), "boolean"), (raw_kind == "null", "null"),
                else_=None)
    raw = func.json_extract(Subscriber.attributes, path)
    text = case((raw_kind == "true", "true"), (raw_kind == "false", "false"),
                else_=cast(raw, String))
    number = case((raw_kind.in_(("integer", "real")), cast(raw, Float)), else_=None)
    return kind, text, number


def _definite(condition: ColumnElement[bool]) -> ColumnElement[bool]:
    """True or false, never SQL's unknown (which NOT would keep unknown)."""
    return case((condition, true()), else_=false())


def _attribute(spec: AttributeFilter, dialect: str) -> ColumnElement[bool]:
    return _definite(_attribute_condition(spec, dialect))


def _attribute_condition(spec: AttributeFilter, dialect: str) -> ColumnElement[bool]:
    kind, text, number = _json_parts(spec.attribute, dialect)
    is_set = _definite(and_(kind.is_not(None), kind != "null"))
    value = spec.value
    if spec.op == "exists":
        return is_set if value is not False else not_(is_set)
    if spec.op in ("gt", "gte", "lt", "lte"):
        limit = float(value)  # type: ignore[arg-type]  # (the column is a float too)
        compare = {"gt": number > limit, "gte": number >= limit, "lt": number < limit,
                   "lte": number <= limit}[spec.op]
        return and_(kind == "number", compare)
    if spec.op == "contains":  # case-sensitive: SQLite's lower() knows only ASCII
        position = (func.strpos(text, str(value)) if dialect == "postgresql"
                    else func.instr(text, str(value)))
        return and_(kind == "string", position > 0)
    if isinstance(value, bool):
        same = and_(kind == "boolean", text == ("true" if value else "false"))
    elif isinstance(value, int | float):
        same = and_(kind == "number", number == float(value))
    else:
        same = and_(kind == "string", text == str(value))
    return _definite(same) if spec.op == "eq" else not_(_definite(same))


def _orders(now: datetime) -> Any:
    """Per contact: frequency, monetary and the last order time, from order events."""
    return (select(
        CustomerEvent.contact_id.label("contact_id"),
        func.count().label("frequency"),
        func.max(CustomerEvent.occurred_at).label("last_order"),
    ).where(CustomerEvent.name == "order_placed", CustomerEvent.contact_id.is_not(None))
        .group_by(CustomerEvent.contact_id).subquery())


def _rfm(group: str, now: datetime) -> ColumnElement[bool]:
    orders = _orders(now)

    def contacts(recency_min: int | None, recency_max: int | None, f_min: int,
                 f_max: int | None) -> Any:
        conditions = [orders.c.frequency >= f_min]
        if f_max is not None:
            conditions.append(orders.c.frequency <= f_max)
        if recency_max is not None:
            conditions.append(orders.c.last_order >= _days_ago(now, recency_max))
        if recency_min is not None:
            conditions.append(orders.c.last_order <= _days_ago(now, recency_min))
        return and_(*conditions)

    earlier: list[ColumnElement[bool]] = []
    for name, r_min, r_max, f_min, f_max in RFM_GROUPS:
        matches = contacts(r_min, r_max, f_min, f_max)
        if name == group:
            chosen = and_(matches, *[not_(e) for e in earlier])
            return Subscriber.contact_id.in_(select(orders.c.contact_id).where(chosen))
        earlier.append(matches)
    assert group == "none"
    in_any = or_(*earlier)
    return Subscriber.contact_id.not_in(select(orders.c.contact_id).where(in_any))


def compile_filter(spec: Any, *, now: datetime, dialect: str) -> ColumnElement[bool]:
    """A SQLAlchemy boolean over ``Subscriber`` for a parsed filter."""
    if isinstance(spec, AllFilter):
        return and_(true(), *[compile_filter(f, now=now, dialect=dialect) for f in spec.all])
    if isinstance(spec, AnyFilter):
        return or_(false(), *[compile_filter(f, now=now, dialect=dialect) for f in spec.any])
    if isinstance(spec, NotFilter):
        return not_(compile_filter(spec.not_, now=now, dialect=dialect))
    if isinstance(spec, TagFilter):
        return Subscriber.id.in_(select(SubscriberTag.subscriber_id).where(
            SubscriberTag.tag == spec.tag))
    if isinstance(spec, AttributeFilter):
        return _attribute(spec, dialect)
    if isinstance(spec, ChannelFilter):
        return Subscriber.channel == spec.channel
    if isinstance(spec, LocaleFilter):
        return func.coalesce(Subscriber.locale, "") == spec.locale
    if isinstance(spec, StatusFilter):
        return Subscriber.status == spec.status
    if isinstance(spec, LastActiveFilter):
        return _range(Subscriber.last_inbound_at, spec.last_active, now)
    if isinstance(spec, CreatedFilter):
        return _range(Subscriber.created_at, spec.created, now)
    if isinstance(spec, EventFilter):
        event = spec.event
        conditions = [CustomerEvent.name == event.name,
                      CustomerEvent.contact_id == Subscriber.contact_id]
        if event.within_days is not None:
            conditions.append(CustomerEvent.occurred_at >= _days_ago(now, event.within_days))
        count = select(func.count()).where(*conditions).scalar_subquery()
        parts = [count >= event.min_count]
        if event.max_count is not None:
            parts.append(count <= event.max_count)
        return and_(*parts)
    if isinstance(spec, RfmFilter):
        return _rfm(spec.rfm, now)
    raise TypeError(f"unknown filter {type(spec).__name__}")


# ---- the reference evaluation (for tests and previews without a database) ---------------


@dataclass
class SubscriberFacts:
    """What the reference evaluation knows about one subscriber."""

    channel: str
    locale: str | None
    status: str
    attributes: Mapping[str, Any]
    tags: set[str]
    created_at: datetime
    last_inbound_at: datetime | None
    events: list[tuple[str, datetime]]  # the contact's events (name, occurred_at)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def evaluate(spec: Any, facts: SubscriberFacts, now: datetime) -> bool:
    """The meaning of a filter, in plain Python."""
    if isinstance(spec, AllFilter):
        return all(evaluate(f, facts, now) for f in spec.all)
    if isinstance(spec, AnyFilter):
        return any(evaluate(f, facts, now) for f in spec.any)
    if isinstance(spec, NotFilter):
        return not evaluate(spec.not_, facts, now)
    if isinstance(spec, TagFilter):
        return spec.tag in facts.tags
    if isinstance(spec, ChannelFilter):
        return facts.channel == spec.channel
    if isinstance(spec, LocaleFilter):
        return (facts.locale or "") == spec.locale
    if isinstance(spec, StatusFilter):
        return facts.status == spec.status
    if isinstance(spec, LastActiveFilter | CreatedFilter):
        moment = facts.last_inbound_at if isinstance(spec, LastActiveFilter) \
            else facts.created_at
        window = spec.last_active if isinstance(spec, LastActiveFilter) else spec.created
        if moment is None:
            return False
        if window.within_days is not None and moment < _days_ago(now, window.within_days):
            return False
        return not (window.before_days is not None
                    and moment > _days_ago(now, window.before_days))
    if isinstance(spec, EventFilter):
        event = spec.event
        count = sum(1 for name, at in facts.events if name == event.name and (
            event.within_days is None or at >= _days_ago(now, event.within_days)))
        return count >= event.min_count and (event.max_count is None
                                             or count <= event.max_count)
    if isinstance(spec, RfmFilter):
        orders = [at for name, at in facts.events if name == "order_placed"]
        recency = (now - max(orders)).total_seconds() / 86400 if orders else None
        return rfm_group(recency, len(orders)) == spec.rfm
    assert isinstance(spec, AttributeFilter)
    actual = facts.attributes.get(spec.attribute)
    value = spec.value
    if spec.op == "exists":
        return (actual is not None) if value is not False else actual is None
    if spec.op in ("gt", "gte", "lt", "lte"):
        number = _number(actual)
        if number is None:
            return False
        limit = float(value)  # type: ignore[arg-type]
        return {"gt": number > limit, "gte": number >= limit, "lt": number < limit,
                "lte": number <= limit}[spec.op]
    if spec.op == "contains":
        return isinstance(actual, str) and str(value) in actual
    if isinstance(value, bool):
        same = isinstance(actual, bool) and actual == value
    elif isinstance(value, int | float):
        same = _number(actual) is not None and float(actual) == float(value)
    else:
        same = isinstance(actual, str) and actual == value
    return same if spec.op == "eq" else not same


async def preview(session: Any, spec: Any, *, now: datetime,
                  sample: int = 10) -> tuple[int, list[Subscriber]]:
    """How many subscribers a filter selects, and the newest few of them."""
    condition = compile_filter(spec, now=now, dialect=session.bind.dialect.name)
    count = await session.scalar(select(func.count()).select_from(Subscriber).where(condition))
    rows = (await session.scalars(select(Subscriber).where(condition)
                                  .order_by(Subscriber.id.desc()).limit(sample))).all()
    return count or 0, list(rows)

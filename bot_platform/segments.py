"""Segments: a JSON filter language over subscribers, compiled to SQLAlchemy expressions
(never string SQL).

    {"all": [{"tag": "vip"},
             {"attribute": "age", "op": "gte", "value": 18},
             {"channel": "telegram"}, {"locale": "uk"}, {"status": "subscribed"},
             {"last_active": {"within_days": 30}},
             {"created": {"before_days": 7}},
             {"event": {"name": "order_placed", "min_count": 2, "within_days": 90}},
             {"rfm": "champions"},
             {"not": {"any": [{"tag": "blocked"}, {"tag": "test"}]}}]}

An ``attribute`` filter means what a flow's attribute condition means: both go through
``bot_platform.flows.conditions`` (``contains`` is case-insensitive, ``in``/``not_in``
take a list, numbers written as text count as numbers), and the tests check that the
SQL selects exactly what a flow's evaluation would.

A filter is bounded (``MAX_DEPTH`` levels, ``MAX_CONDITIONS`` conditions, texts that fit
their columns, numbers a database compares), so compiling one stays cheap enough for the
event loop that API, webhooks and delivery share.

RFM comes from ``order_placed`` events (``data.total`` is the money): recency = days since
the contact's last order, frequency = orders, monetary = their sum.
"""

from __future__ import annotations

import math
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
    and_,
    false,
    func,
    not_,
    or_,
    select,
    true,
)
from sqlalchemy.sql import ColumnElement

from bot_platform.flows.conditions import (
    COMPARISONS,
    Op,
    attribute_parts,
    attribute_sql,
)
from bot_platform.models import CustomerEvent, Subscriber, SubscriberTag
from bot_platform.text import INT64_MAX, INT64_MIN, text

MAX_DEPTH = 8  # levels of all/any/not
MAX_CONDITIONS = 100  # tests on subscribers (not all/any/not); an RFM group as RFM_WEIGHT,
# an in/not_in as its number of values
RFM_WEIGHT = 5  # an RFM group compiles to several subqueries
MAX_DAYS = 36_500  # a hundred years back is "ever"
MAX_COUNT = 1_000_000_000


class _Filter(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class TagFilter(_Filter):
    tag: text(64)


Scalar = text(1024) | float | int | bool
MAX_ITEMS = 100  # values of one in/not_in


def _check_scalar(value: Any) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("the value must be a finite number")
    if isinstance(value, int) and not isinstance(value, bool) and not (
            INT64_MIN <= value <= INT64_MAX):
        raise ValueError("the value is out of the 64-bit integer range")


class AttributeFilter(_Filter):
    """An attribute compared with ``value``, with the flows' semantics
    (``bot_platform.flows.conditions``): ``eq``/``ne`` compare numbers (numbers written
    as text too) as numbers and anything else only with its own kind; ``gt``/``gte``/
    ``lt``/``lte`` need a number and never match a non-number; ``in``/``not_in``: ``eq``
    against any value of a list; ``contains`` looks for text inside text, ignoring case;
    ``exists`` is true when the attribute is set (``value: false``: when it is not)."""

    attribute: str = Field(pattern=r"^[A-Za-z0-9_]{1,64}$")
    op: Op = "eq"
    value: Scalar | list[Scalar] | None = None

    @model_validator(mode="after")
    def _value_fits_op(self) -> AttributeFilter:
        many = isinstance(self.value, list)
        if self.op in ("in", "not_in"):
            if not many:
                raise ValueError(f"op {self.op} needs a list of values")
            if len(self.value) > MAX_ITEMS:  # type: ignore[arg-type]
                raise ValueError(f"op {self.op} takes at most {MAX_ITEMS} values")
        elif many:
            raise ValueError(f"op {self.op} needs a single value, not a list")
        for value in self.value if many else [self.value]:  # type: ignore[union-attr]
            _check_scalar(value)
        if self.op in COMPARISONS and (
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
        values = node.get("value") if "attribute" in node else None
        conditions += 0 if nested else RFM_WEIGHT if "rfm" in node else (
            max(1, len(values)) if isinstance(values, list) else 1)  # in: one per value
        if conditions > MAX_CONDITIONS:
            raise PydanticCustomError(
                "filter_too_large",
                f"a filter has at most {{limit}} conditions (an rfm one counts {RFM_WEIGHT}, "
                "an in/not_in one each value)",
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


def _attribute(spec: AttributeFilter, dialect: str) -> ColumnElement[bool]:
    parts = attribute_parts(Subscriber.attributes, spec.attribute, dialect)
    return attribute_sql(spec.op, spec.value, parts, dialect)


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


async def preview(session: Any, spec: Any, *, now: datetime,
                  sample: int = 10) -> tuple[int, list[Subscriber]]:
    """How many subscribers a filter selects, and the newest few of them."""
    condition = compile_filter(spec, now=now, dialect=session.bind.dialect.name)
    count = await session.scalar(select(func.count()).select_from(Subscriber).where(condition))
    rows = (await session.scalars(select(Subscriber).where(condition)
                                  .order_by(Subscriber.id.desc()).limit(sample))).all()
    return count or 0, list(rows)

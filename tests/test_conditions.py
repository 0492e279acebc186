"""One meaning of an attribute condition: what a flow's ``when`` evaluates in Python is what
a segment's attribute filter selects in SQL (``bot_platform.flows.conditions``)."""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter
from sqlalchemy import select

from bot_platform.database import Database
from bot_platform.flows.conditions import AttributeCondition, attribute_holds, condition_holds
from bot_platform.flows.turn import Turn
from bot_platform.models import Base, Contact, Subscriber
from bot_platform.segments import Filter, compile_filter

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
FILTER = TypeAdapter(Filter)


@pytest.mark.parametrize(("op", "actual", "expected", "holds"), [
    ("gte", "9", 9, True),  # a button's answer is text; it still counts as a number
    ("eq", "29,99", 29.99, True),
    ("eq", "018", "18", True),
    ("eq", "1e3", 1000, False),  # only plain digits are numbers
    ("eq", True, 1, False),  # true is not 1
    ("eq", "yes", "yes", True),
    ("ne", None, "yes", True),
    ("contains", "Київ, Хрещатик", "КИЇВ", True),  # case-insensitive, any script
    ("contains", 12345, "23", False),  # text inside text only
    ("in", "uk", ["en", "uk"], True),
    ("in", "5", [5, 6], True),
    ("not_in", None, ["en"], True),
    ("exists", 0, True, True),
    ("exists", None, False, True),
    ("gt", "many", 3, False),
])
def test_attribute_semantics(op: str, actual: Any, expected: Any, holds: bool) -> None:
    assert attribute_holds(op, actual, expected) is holds


letters = st.text(alphabet="aAbBßẞİıσΣςÜüїЇ", min_size=1, max_size=4)
scalars = st.one_of(st.booleans(), st.integers(-20, 20), st.sampled_from([0.5, -2.25]),
                    letters, st.sampled_from(["7", "-3", "0,5", "+2", "07", "7.", "٧"]))
attributes = st.one_of(scalars, st.lists(letters, max_size=2))
conditions = st.one_of(
    st.builds(lambda op, v: {"op": op, "value": v}, st.sampled_from(["eq", "ne"]), scalars),
    st.builds(lambda op, v: {"op": op, "value": v},
              st.sampled_from(["gt", "gte", "lt", "lte"]),
              st.one_of(st.integers(-20, 20), st.sampled_from([0.5, -2.25]))),
    st.builds(lambda op, v: {"op": op, "value": v}, st.sampled_from(["in", "not_in"]),
              st.lists(scalars, max_size=3)),
    st.builds(lambda v: {"op": "contains", "value": v}, letters),
    st.builds(lambda v: {"op": "exists", "value": v}, st.booleans()),
)


async def _agree(url: str, people: list[Any], tests: list[dict[str, Any]]) -> None:
    db = Database(url)
    try:
        async with db.engine.begin() as connection:
            await connection.run_sync(Base.metadata.create_all)
        turns = {}
        async with db.session() as session:
            for n, value in enumerate(people):
                contact = Contact(created_at=NOW)
                session.add(contact)
                await session.flush()
                subscriber = Subscriber(
                    contact_id=contact.id, channel="telegram", bot_id="b", user_id=f"u{n}",
                    status="subscribed", attributes={} if value is None else {"x": value},
                    created_at=NOW, updated_at=NOW)
                session.add(subscriber)
                await session.flush()
                turns[subscriber.id] = Turn(
                    subscriber_id=subscriber.id, contact_id=contact.id, channel="telegram",
                    locale="en", now=NOW, attributes=dict(subscriber.attributes), tags=set(),
                    profile={}, positions={})
        async with db.session() as session:
            for test in tests:
                segment = FILTER.validate_python({"attribute": "x", **test})
                selected = set((await session.scalars(select(Subscriber.id).where(
                    compile_filter(segment, now=NOW, dialect=db.dialect)))).all())
                condition = AttributeCondition(attribute="x", **test)
                in_flow = {i for i, turn in turns.items() if condition_holds(condition, turn)}
                assert selected == in_flow, test
    finally:
        await db.close()


@settings(max_examples=40, deadline=None, derandomize=os.environ.get("CI") == "true",
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(people=st.lists(st.one_of(st.none(), attributes), min_size=1, max_size=10),
       tests=st.lists(conditions, min_size=1, max_size=8))
def test_a_flow_condition_and_a_segment_agree_on_sqlite(tmp_path_factory, people,
                                                         tests) -> None:
    folder = tmp_path_factory.mktemp("conditions")
    asyncio.run(_agree(f"sqlite+aiosqlite:///{folder}/c.sqlite3", people, tests))

"""An inbound event is made storable once, by its own validators (types.Inbound): what
a messenger sends is cut to its columns and cleaned, never refused, so a re-sent update
cannot fail forever."""

from __future__ import annotations

import math

from bot_platform.text import INT64_MAX, JSON_MAX_DEPTH, json_problem, unstorable
from bot_platform.types import MAX_DATA_STRING, Inbound, InboundKind, Profile


def nested(depth: int) -> dict:
    value: dict = {"leaf": 1}
    for _ in range(depth):
        value = {"k": value}
    return value


def messy() -> Inbound:
    return Inbound(
        channel="c" * 40, bot_id="b" * 70, user_id="u\x001", event_id="e\ud8001",
        kind=InboundKind.TEXT, text="hi\x00", payload="p\ud800", ref="r" * 300,
        message_ids=("m" * 300,),
        data={"big": INT64_MAX + 1, "nan": math.nan, "k" * 5000: "v" * 5000,
              "deep": nested(JSON_MAX_DEPTH + 5)},
        profile=Profile(first_name="A\x00" * 200, last_name="B" * 300, username="c\ud800",
                        phone="+1" * 30))


def test_ids_names_and_text_are_cut_to_their_columns_and_cleaned() -> None:
    event = messy()
    assert (len(event.channel), len(event.bot_id)) == (32, 64)
    assert (event.user_id, event.text) == ("u1", "hi")
    assert len(event.ref or "") == 255 and len(event.message_ids[0]) == 255
    assert len(event.profile.first_name or "") == 200  # NULs gone, then within 255
    assert len(event.profile.last_name or "") == 255 and len(event.profile.phone or "") == 32
    for text in (event.event_id, event.payload, event.profile.username):
        assert text is not None and unstorable(text) is None


def test_data_is_storable_json_with_bounded_strings() -> None:
    data = messy().data
    assert json_problem(data) is None
    assert data["big"] == str(INT64_MAX + 1) and data["nan"] == "nan"
    assert {len(k) for k in data} >= {MAX_DATA_STRING}
    assert all(len(v) <= MAX_DATA_STRING for v in data.values() if isinstance(v, str))

"""Segments: preview a filter (count and a sample) before a broadcast uses it."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Query
from pydantic import BaseModel, TypeAdapter, ValidationError

from admin_api.errors import unprocessable
from admin_api.security import MARKETING, PlatformDep, roles
from admin_api.subscribers import SubscriberPublic, _public, _tags
from bot_platform.segments import Filter, preview

router = APIRouter(prefix="/segments", tags=["segments"])
FILTER = TypeAdapter(Filter)


class Preview(BaseModel):
    count: int
    sample: list[SubscriberPublic]


def parse_filter(raw: Any) -> Any:
    """A filter, or 422 naming the first problem's exact path (``filter.all[1].tag``), in
    the documented shape (``loc``, ``msg``, ``type``, plus ``path`` and ``message``)."""
    try:
        return FILTER.validate_python(raw)
    except ValidationError as error:
        problems = []
        for item in error.errors():
            path, loc = "filter", ["body", "filter"]
            for part in item["loc"]:
                if isinstance(part, int):
                    path += f"[{part}]"
                elif part[0].isupper() or "[" in part or part in (
                        "json-or-python", "function-after", "function-before"):
                    continue  # a union branch's or validator's name, not a place
                else:
                    path += f".{part}"
                loc.append(part)
            problems.append({"loc": loc, "msg": item["msg"], "type": item["type"],
                             "path": path, "message": item["msg"]})
        # The branch that got furthest into the document is the one the author meant.
        deepest = max(len(p["path"]) for p in problems)
        raise HTTPException(422, [p for p in problems if len(p["path"]) == deepest]) from None


@router.post("/preview", response_model=Preview, **roles(MARKETING))
async def preview_segment(platform: PlatformDep,
                          body: dict[str, Any], sample: int = Query(10, ge=0, le=100)) -> Preview:
    """How many subscribers ``{"filter": ...}`` selects, and the newest few."""
    if "filter" not in body:
        raise unprocessable("give the filter: {\"filter\": {...}}", loc=("body", "filter"),
                            kind="missing")
    spec = parse_filter(body["filter"])
    async with platform.db.session() as session:
        count, rows = await preview(session, spec, now=platform.clock.now(), sample=sample)
        tags = await _tags(session, [r.id for r in rows])
    return Preview(count=count, sample=[_public(r, tags[r.id]) for r in rows])

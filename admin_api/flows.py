"""Flows: upload a new version (validated with the same messages as ``botp flows
validate``), list versions, activate one explicitly."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, HTTPException, Path
from pydantic import BaseModel
from sqlalchemy import func, select, update

from admin_api.security import MARKETING, get_platform, roles
from bot_platform.flow_dsl import check_cross_flow, parse_flow_text
from bot_platform.models import FlowVersion
from bot_platform.text import INT32_MAX, StorableText, text

FlowName = text(64, min_length=1)

router = APIRouter(prefix="/flows", tags=["flows"])


class FlowVersionPublic(BaseModel):
    flow: str
    version: int
    active: bool
    created_at: datetime
    activated_at: datetime | None
    warnings: list[str] = []


class FlowInUse(BaseModel):
    flow: str
    description: str
    states: int
    triggers: list[str]
    source: str  # the file, or "<flow> v<version>" for an uploaded version


@router.get("", response_model=list[FlowInUse], **roles(MARKETING))
async def flows_in_use(platform: Any = Depends(get_platform)) -> list[FlowInUse]:
    active = {}
    async with platform.db.session() as session:
        for flow, version in (await session.execute(select(
                FlowVersion.flow, FlowVersion.version).where(
                FlowVersion.active.is_(True)))).all():
            active[flow] = f"{flow} v{version}"
    return [FlowInUse(flow=name, description=flow.spec.description,
                      states=len(flow.spec.states),
                      triggers=[t.on for t in flow.spec.triggers],
                      source=active.get(name, "file"))
            for name, flow in sorted(platform.flows.flows.items())]


@router.post("", status_code=201, response_model=FlowVersionPublic, **roles(MARKETING))
async def upload(text: StorableText = Body(media_type="application/yaml"),
                 platform: Any = Depends(get_platform)) -> FlowVersionPublic:
    """Store a new version of a flow (not active until activated); an invalid flow is
    rejected with 422 and every problem (path and reason)."""
    spec, issues = parse_flow_text(text, "upload.yaml", platform.catalogs)
    if spec is not None:
        known = {name: (flow.spec, name) for name, flow in platform.flows.flows.items()}
        known[spec.flow] = (spec, "upload.yaml")
        issues += [i for i in check_cross_flow(known) if i.file == "upload.yaml"]
    errors = [i for i in issues if i.severity == "error"]
    if spec is None or errors:
        raise HTTPException(422, [{"loc": ["body", *i.path.split(".")], "msg": i.message,
                                   "type": "flow_invalid", "path": i.path,
                                   "message": i.message} for i in errors])
    now = platform.clock.now()
    async with platform.db.session() as session:
        latest = await session.scalar(select(func.max(FlowVersion.version)).where(
            FlowVersion.flow == spec.flow))
        row = FlowVersion(flow=spec.flow, version=(latest or 0) + 1, text=text,
                          active=False, created_at=now)
        session.add(row)
        await session.flush()
        data = FlowVersionPublic.model_validate(row, from_attributes=True)
    return data.model_copy(update={"warnings": [f"{i.path}: {i.message}" for i in issues]})


@router.get("/{flow}/versions", response_model=list[FlowVersionPublic], **roles(MARKETING))
async def versions(flow: FlowName,
                   platform: Any = Depends(get_platform)) -> list[FlowVersionPublic]:
    async with platform.db.session() as session:
        rows = (await session.scalars(select(FlowVersion).where(FlowVersion.flow == flow)
                                      .order_by(FlowVersion.version))).all()
    return [FlowVersionPublic.model_validate(r, from_attributes=True) for r in rows]


@router.post("/{flow}/versions/{version}/activate", response_model=FlowVersionPublic,
             **roles(MARKETING))
async def activate(flow: FlowName, version: Annotated[int, Path(ge=1, le=INT32_MAX)],
                   platform: Any = Depends(get_platform)) -> FlowVersionPublic:
    """Make this version the one in use (here at once; other processes within a round)."""
    now = platform.clock.now()
    async with platform.db.session() as session:
        row = await session.scalar(select(FlowVersion).where(
            FlowVersion.flow == flow, FlowVersion.version == version))
        if row is None:
            raise HTTPException(404, "no such flow version")
        await session.execute(update(FlowVersion).where(FlowVersion.flow == flow)
                              .values(active=False))
        row.active, row.activated_at = True, now
        data = FlowVersionPublic.model_validate(row, from_attributes=True)
    await platform.reload_flows()
    return data

"""Flows: upload a new version (validated with the same messages as ``botp flows
validate``), with the texts it uses per locale if they are new, list versions, activate
one explicitly (every process follows within ``flow_reload_seconds``)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Body, HTTPException, Path
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from sqlalchemy import case, func, select, update

from admin_api.security import MARKETING, PlatformDep, roles
from bot_platform.errors import FlowIssue
from bot_platform.flow_versions import Texts, active_versions, version_texts
from bot_platform.flows.loading import load_yaml, parse_flow_text
from bot_platform.flows.validation import check_cross_flow
from bot_platform.i18n import LOCALE_PATTERN, parse_ftl
from bot_platform.models import FlowVersion
from bot_platform.platform import Platform
from bot_platform.text import INT32_MAX, StorableText, text

FlowName = text(64, min_length=1)
Locale = Annotated[str, StringConstraints(pattern=LOCALE_PATTERN, max_length=16)]

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
async def flows_in_use(platform: PlatformDep) -> list[FlowInUse]:
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


class FlowUpload(BaseModel):
    """A flow and the catalog entries it brings, per locale, in Fluent syntax
    (``{"en": "spring-hi = Hi { $first_name }!\\n"}``). While the version is active its
    entries are in use in every process, over file entries of the same key."""

    model_config = ConfigDict(extra="forbid")

    yaml: StorableText
    texts: dict[Locale, StorableText] = Field(default_factory=dict, max_length=64)


def _flow_name(source: str) -> str | None:
    try:
        raw = load_yaml(source)
    except Exception:  # reported by the validator with its line
        return None
    name = raw.get("flow") if isinstance(raw, dict) else None
    return name if isinstance(name, str) else None


def _problem(issue: FlowIssue, loc: list[str]) -> dict[str, Any]:
    where = issue.file.removeprefix("upload.yaml")
    return {"loc": [*loc, *(issue.path.split(".") if issue.path else [])],
            "msg": f"{where.lstrip(':')}: {issue.message}" if where else issue.message,
            "type": "flow_invalid", "path": issue.path, "message": issue.message}


async def _check(platform: Platform, source: str, texts: dict[str, str],
                 yaml_loc: list[str]) -> tuple[Any, list[FlowIssue], list[dict[str, Any]]]:
    """Validate the flow with the catalogs it would run with (the files, the other active
    flows' texts and ``texts``): the flow, its issues, and every error as a 422 problem."""
    problems = []
    upload: Texts = {}
    for locale, entries in sorted(texts.items()):
        upload[locale] = [(f"texts.{locale}", entries)]
        _, found = parse_ftl(upload[locale])
        problems += [_problem(i, ["body", "texts", locale]) | {"line": int(
            i.file.rpartition(":")[2])} for i in found]
    name = _flow_name(source)
    others = [row for row in await active_versions(platform.db) if row.flow != name]
    catalogs = platform.catalogs.with_texts(version_texts(others, upload))
    spec, issues = parse_flow_text(source, "upload.yaml", catalogs)
    if spec is not None:
        known = {name: (flow.spec, name) for name, flow in platform.flows.flows.items()}
        known[spec.flow] = (spec, "upload.yaml")
        issues += [i for i in check_cross_flow(known) if i.file == "upload.yaml"]
    problems += [_problem(i, yaml_loc) for i in issues if i.severity == "error"]
    return spec, issues, problems


async def _store(platform: Platform, source: str, texts: dict[str, str],
                 yaml_loc: list[str]) -> FlowVersionPublic:
    """Validate the flow, every problem at once, and store it as a new version."""
    spec, issues, problems = await _check(platform, source, texts, yaml_loc)
    if spec is None or problems:
        raise HTTPException(422, problems)
    now = platform.clock.now()
    async with platform.db.session() as session:
        latest = await session.scalar(select(func.max(FlowVersion.version)).where(
            FlowVersion.flow == spec.flow))
        row = FlowVersion(flow=spec.flow, version=(latest or 0) + 1, text=source,
                          texts=dict(texts) or None, active=False, created_at=now)
        session.add(row)
        await session.flush()
        data = FlowVersionPublic.model_validate(row, from_attributes=True)
    return data.model_copy(update={"warnings": [f"{i.path}: {i.message}" for i in issues]})


class FlowCheck(BaseModel):
    """What the validator says of a flow: every error and warning with its path;
    ``valid`` when there is no error."""

    valid: bool
    issues: list[dict[str, str]]


@router.post("/validate", response_model=FlowCheck, **roles(MARKETING))
async def validate(platform: PlatformDep,
                   text: StorableText = Body(media_type="application/yaml",
                                             description="A flow file (YAML)")) -> FlowCheck:
    """Check a flow file as ``botp flows validate`` would (with the catalogs and flows in
    use), every problem at once, storing nothing."""
    spec, issues, problems = await _check(platform, text, {}, ["body"])
    return FlowCheck(valid=spec is not None and not problems, issues=[
        {"severity": i.severity, "path": i.path, "message": i.message} for i in issues])


@router.post("", status_code=201, response_model=FlowVersionPublic, **roles(MARKETING))
async def upload(platform: PlatformDep,
                 text: StorableText = Body(media_type="application/yaml")) -> FlowVersionPublic:
    """Store a new version of a flow (not active until activated); an invalid flow is
    rejected with 422 and every problem (path and reason). Its texts must exist already;
    ``POST /api/flows/versions`` uploads a flow with its texts."""
    return await _store(platform, text, {}, ["body"])


@router.post("/versions", status_code=201, response_model=FlowVersionPublic,
             **roles(MARKETING))
async def upload_with_texts(body: FlowUpload,
                            platform: PlatformDep) -> FlowVersionPublic:
    """Store a new version of a flow with its catalog entries per locale (not active
    until activated). Checked like files: Fluent syntax errors and duplicate keys with
    their line, every key the flow uses must exist in the default locale (in ``texts`` or
    the files) -> 422 with every problem."""
    return await _store(platform, body.yaml, body.texts, ["body", "yaml"])


@router.get("/{flow}/versions", response_model=list[FlowVersionPublic], **roles(MARKETING))
async def versions(flow: FlowName,
                   platform: PlatformDep) -> list[FlowVersionPublic]:
    async with platform.db.session() as session:
        rows = (await session.scalars(select(FlowVersion).where(FlowVersion.flow == flow)
                                      .order_by(FlowVersion.version))).all()
    return [FlowVersionPublic.model_validate(r, from_attributes=True) for r in rows]


@router.post("/{flow}/versions/{version}/activate", response_model=FlowVersionPublic,
             **roles(MARKETING))
async def activate(flow: FlowName, version: Annotated[int, Path(ge=1, le=INT32_MAX)],
                   platform: PlatformDep) -> FlowVersionPublic:
    """Make this version the one in use: here at once, in every other process (web and
    worker) within ``flow_reload_seconds``. One statement switches every version of the
    flow, so concurrent activations leave exactly one active."""
    now = platform.clock.now()
    chosen = FlowVersion.version == version
    async with platform.db.session() as session:
        if await session.scalar(select(FlowVersion.id).where(
                FlowVersion.flow == flow, chosen)) is None:
            raise HTTPException(404, "no such flow version")
        await session.execute(update(FlowVersion).where(FlowVersion.flow == flow).values(
            active=chosen, activated_at=case((chosen, now),
                                             else_=FlowVersion.activated_at)))
        row = await session.scalar(select(FlowVersion).where(FlowVersion.flow == flow,
                                                             chosen))
        data = FlowVersionPublic.model_validate(row, from_attributes=True)
    await platform.reload_flows()
    return data

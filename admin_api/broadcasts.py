"""Broadcasts: draft, schedule, start, pause, resume, cancel, and their figures."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel
from sqlalchemy import select

from admin_api.errors import unprocessable
from admin_api.security import MARKETING, PlatformDep, roles
from bot_platform import broadcasts
from bot_platform.broadcasts import BroadcastCreate
from bot_platform.models import Broadcast
from bot_platform.platform import Platform
from bot_platform.text import DbId

router = APIRouter(prefix="/broadcasts", tags=["broadcasts"])


class BroadcastPublic(BaseModel):
    id: int
    name: str
    status: str
    segment: dict[str, Any]
    variants: list[dict[str, Any]]
    tag: str | None
    scheduled_at: datetime | None
    local_time: str | None
    started_at: datetime | None
    finished_at: datetime | None
    created_at: datetime
    stats: dict[str, Any] | None = None


async def _load(session: Any, broadcast_id: int) -> Broadcast:
    broadcast = await session.get(Broadcast, broadcast_id)
    if broadcast is None:
        raise HTTPException(404, "no such broadcast")
    return broadcast


@router.post("", status_code=201, response_model=BroadcastPublic, **roles(MARKETING))
async def create_broadcast(body: BroadcastCreate,
                           platform: PlatformDep) -> BroadcastPublic:
    """A draft; nothing is sent until it is started."""
    unknown = [v.flow for v in body.variants if v.flow and v.flow not in platform.flows]
    if unknown:
        raise unprocessable(f"unknown flow(s): {', '.join(unknown)}")
    async with platform.db.session() as session:
        broadcast = await broadcasts.create(session, body, platform.clock.now())
        return BroadcastPublic.model_validate(broadcast, from_attributes=True)


@router.get("", response_model=list[BroadcastPublic], **roles(MARKETING))
async def list_broadcasts(platform: PlatformDep) -> list[BroadcastPublic]:
    async with platform.db.session() as session:
        rows = (await session.scalars(select(Broadcast).order_by(Broadcast.id.desc())
                                      .limit(200))).all()
    return [BroadcastPublic.model_validate(r, from_attributes=True) for r in rows]


@router.get("/{broadcast_id}", response_model=BroadcastPublic, **roles(MARKETING))
async def get_broadcast(broadcast_id: DbId,
                        platform: PlatformDep) -> BroadcastPublic:
    """The broadcast with its figures per variant."""
    async with platform.db.session() as session:
        broadcast = await _load(session, broadcast_id)
        figures = await broadcasts.stats(session, broadcast)
        data = BroadcastPublic.model_validate(broadcast, from_attributes=True)
    return data.model_copy(update={"stats": figures})


async def _act(platform: Platform, broadcast_id: int, action: str) -> BroadcastPublic:
    """One lifecycle change as a compare-and-set on the broadcast's status: of concurrent
    callers exactly one wins, the others get 409 with the status they found."""
    now = platform.clock.now()
    async with platform.db.session() as session:
        try:
            if action == "start":
                broadcast = await broadcasts.start(session, broadcast_id, now)
            elif action == "pause":
                broadcast = await broadcasts.pause(session, broadcast_id)
            elif action == "resume":
                broadcast = await broadcasts.resume(session, broadcast_id, now)
            else:
                broadcast = await broadcasts.cancel(session, broadcast_id, now)
        except broadcasts.NotFound as error:
            raise HTTPException(404, "no such broadcast") from error
        except broadcasts.Conflict as error:
            raise HTTPException(409, str(error)) from error
        data = BroadcastPublic.model_validate(broadcast, from_attributes=True)
    platform.engine.on_commit()
    return data


@router.post("/{broadcast_id}/start", response_model=BroadcastPublic, **roles(MARKETING))
async def start_broadcast(broadcast_id: DbId,
                          platform: PlatformDep) -> BroadcastPublic:
    """Snapshot the recipients and send (or wait for ``scheduled_at``). Only a draft
    starts: concurrent starts -> one 200, the rest 409; a scheduled broadcast -> 409."""
    return await _act(platform, broadcast_id, "start")


@router.post("/{broadcast_id}/pause", response_model=BroadcastPublic, **roles(MARKETING))
async def pause_broadcast(broadcast_id: DbId,
                          platform: PlatformDep) -> BroadcastPublic:
    """Stop queueing; queued rows no delivery worker has claimed are held (409 unless
    running)."""
    return await _act(platform, broadcast_id, "pause")


@router.post("/{broadcast_id}/resume", response_model=BroadcastPublic, **roles(MARKETING))
async def resume_broadcast(broadcast_id: DbId,
                           platform: PlatformDep) -> BroadcastPublic:
    """Release the held rows and carry on where the broadcast stopped (409 unless
    paused)."""
    return await _act(platform, broadcast_id, "resume")


@router.post("/{broadcast_id}/cancel", response_model=BroadcastPublic, **roles(MARKETING))
async def cancel_broadcast(broadcast_id: DbId,
                           platform: PlatformDep) -> BroadcastPublic:
    """Skip everything not yet handed to a delivery worker (409 when completed or already
    cancelled)."""
    return await _act(platform, broadcast_id, "cancel")

"""API keys: admins create (shown once), list and revoke them."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field
from sqlalchemy import select

from admin_api.security import ADMIN, EVERYONE, PlatformDep, current, roles
from bot_platform.apikeys import ROLES, Principal, create_key
from bot_platform.models import ApiKey
from bot_platform.text import DbId, text

router = APIRouter(prefix="/keys", tags=["keys"])


class KeyCreate(BaseModel):
    name: text(64, min_length=1)
    role: str = Field(pattern=f"^({'|'.join(ROLES)})$")


class KeyPublic(BaseModel):
    id: int
    name: str
    role: str
    prefix: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class KeyCreated(KeyPublic):
    key: str = Field(description="The secret key. Shown only now: store it safely.")


class Me(BaseModel):
    key_id: int
    name: str
    role: str


@router.post("", status_code=201, response_model=KeyCreated, **roles(ADMIN))
async def create(body: KeyCreate, platform: PlatformDep) -> KeyCreated:
    """Create a key; the response is the only time the secret is shown."""
    key_id, key = await create_key(platform.db, name=body.name, role=body.role,
                                   now=platform.clock.now())
    async with platform.db.session() as session:
        row = await session.get(ApiKey, key_id)
    return KeyCreated(**KeyPublic.model_validate(row, from_attributes=True).model_dump(),
                      key=key)


@router.get("", response_model=list[KeyPublic], **roles(ADMIN))
async def list_keys(platform: PlatformDep) -> list[KeyPublic]:
    async with platform.db.session() as session:
        rows = (await session.scalars(select(ApiKey).order_by(ApiKey.id))).all()
    return [KeyPublic.model_validate(row, from_attributes=True) for row in rows]


@router.delete("/{key_id}", status_code=204, **roles(ADMIN))
async def revoke(key_id: DbId, platform: PlatformDep) -> None:
    async with platform.db.session() as session:
        row = await session.get(ApiKey, key_id)
        if row is None:
            raise HTTPException(404, "no such key")
        row.revoked_at = row.revoked_at or platform.clock.now()


me_router = APIRouter(tags=["keys"])


@me_router.get("/me", response_model=Me, openapi_extra={"x-roles": sorted(EVERYONE)})
async def me(principal: Principal = current(EVERYONE)) -> Me:
    """Who this key is."""
    return Me(key_id=principal.key_id, name=principal.name, role=principal.role)

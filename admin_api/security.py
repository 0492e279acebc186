"""Authentication and roles for the admin API.

Every route declares the roles it admits with ``roles(...)``; the declaration is both the
check (a dependency) and data (``openapi_extra["x-roles"]``) that the role-matrix test
reads, so no route can be added without saying who may call it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import Depends, HTTPException
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from bot_platform.apikeys import Principal, verify_key
from bot_platform.app import PlatformDep, get_platform

__all__ = ["PlatformDep", "authenticate", "current", "get_platform", "roles"]

ADMIN = frozenset({"admin"})
MARKETING = frozenset({"admin", "marketer"})
SUPPORT = frozenset({"admin", "agent"})
EVERYONE = frozenset({"admin", "marketer", "agent"})

_bearer = HTTPBearer(auto_error=False, description="An API key: `Bearer botp_...`")
_header = APIKeyHeader(name="X-API-Key", auto_error=False)


async def authenticate(
    platform: PlatformDep,
    bearer: HTTPAuthorizationCredentials | None = Depends(_bearer),
    header: str | None = Depends(_header),
) -> Principal:
    """The caller's key, from ``Authorization: Bearer`` or ``X-API-Key``; 401 otherwise."""
    key = bearer.credentials if bearer is not None else header
    principal = await verify_key(platform.db, key, platform.clock.now()) if key else None
    if principal is None:
        raise HTTPException(401, "a valid API key is required",
                            headers={"WWW-Authenticate": "Bearer"})
    return principal


def _require(allowed: frozenset[str]) -> Callable[..., Any]:
    async def check(principal: Principal = Depends(authenticate)) -> Principal:
        if principal.role not in allowed:
            raise HTTPException(403, f"role {principal.role!r} may not do this")
        return principal
    return check


def roles(allowed: frozenset[str]) -> dict[str, Any]:
    """Route keyword arguments that admit only ``allowed`` roles (and document it)."""
    return {"dependencies": [Depends(_require(allowed))],
            "openapi_extra": {"x-roles": sorted(allowed)}}


def current(allowed: frozenset[str]) -> Any:
    """A parameter default giving the handler the caller, checked against ``allowed``."""
    return Depends(_require(allowed))

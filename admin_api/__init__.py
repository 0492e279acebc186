"""The admin API (FastAPI routers under ``/api``), mounted by the platform's app when this
package is importable. Every route declares its roles (``admin_api.security``)."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from admin_api.errors import ERROR_RESPONSES, MAX_BODY, error_shapes
from bot_platform.platform import Platform


def create_router(platform: Platform) -> APIRouter:
    from admin_api import (
        bots,
        broadcasts,
        conversations,
        flows,
        inbox,
        keys,
        segments,
        shop,
        stats,
        subscribers,
    )

    # Every operation documents the error shapes and is held to them; bodies are capped
    # (bulk uploads raise their own limit).
    api = APIRouter(prefix="/api", responses=ERROR_RESPONSES, max_body_size=MAX_BODY,
                    dependencies=[Depends(error_shapes)])
    router = APIRouter()
    api.include_router(keys.me_router)
    api.include_router(keys.router)
    api.include_router(bots.router)
    api.include_router(subscribers.router)
    api.include_router(segments.router)
    api.include_router(broadcasts.router)
    api.include_router(stats.router)
    api.include_router(conversations.router)
    api.include_router(shop.router)
    api.include_router(flows.router)
    router.include_router(api)
    router.include_router(inbox.router)
    return router

"""The admin API (FastAPI routers under ``/api``), mounted by the platform's app when this
package is importable. Every route declares its roles (``admin_api.security``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter


def create_router(platform: Any) -> APIRouter:
    from admin_api import (
        bots,
        broadcasts,
        conversations,
        flows,
        keys,
        segments,
        shop,
        stats,
        subscribers,
    )

    router = APIRouter(prefix="/api")
    router.include_router(keys.me_router)
    router.include_router(keys.router)
    router.include_router(bots.router)
    router.include_router(subscribers.router)
    router.include_router(segments.router)
    router.include_router(broadcasts.router)
    router.include_router(stats.router)
    router.include_router(conversations.router)
    router.include_router(shop.router)
    router.include_router(flows.router)
    return router

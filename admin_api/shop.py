"""What the shop feeds in: customer events, products, promo codes."""

from __future__ import annotations

from fastapi import APIRouter, Body, HTTPException
from pydantic import BaseModel, Field

from admin_api.errors import MAX_UPLOAD
from admin_api.security import MARKETING, PlatformDep, roles
from bot_platform.catalog import ProductIn, upsert_products
from bot_platform.events import EventIn, IngestResult, ingest
from bot_platform.promo import import_codes, pool_counts
from bot_platform.text import text

Pool = text(64, min_length=1)

router = APIRouter(tags=["shop"])


class EventBatch(BaseModel):
    events: list[EventIn] = Field(min_length=1, max_length=1000)


class ProductsImported(BaseModel):
    imported: int


class PoolPublic(BaseModel):
    pool: str
    total: int
    free: int
    added: int = 0


class CodesUpload(BaseModel):
    codes: list[text(64, min_length=1)] = Field(min_length=1, max_length=100_000)


@router.post("/events", response_model=IngestResult, **roles(MARKETING))
async def post_event(event: EventIn, platform: PlatformDep) -> IngestResult:
    """Record one shop event (idempotent by ``event_id``) and let flows react."""
    return await ingest(platform.engine, event)


@router.post("/events/batch", response_model=list[IngestResult], **roles(MARKETING))
async def post_events(batch: EventBatch,
                      platform: PlatformDep) -> list[IngestResult]:
    """Up to 1,000 events, in order; each is idempotent by its ``event_id``."""
    return [await ingest(platform.engine, event) for event in batch.events]


@router.post("/catalog/products", response_model=ProductsImported, max_body_size=MAX_UPLOAD,
             **roles(MARKETING))
async def put_products(platform: PlatformDep,
                       products: list[ProductIn] = Body(min_length=1, max_length=10_000),
                       ) -> ProductsImported:
    """Add or update products (matched by ``sku``; of a sku given twice, the last)."""
    count = await upsert_products(platform.db, products, platform.clock.now())
    return ProductsImported(imported=count)


@router.post("/promo-pools/{pool}/codes", response_model=PoolPublic, max_body_size=MAX_UPLOAD,
             **roles(MARKETING))
async def upload_codes(pool: Pool, body: CodesUpload,
                       platform: PlatformDep) -> PoolPublic:
    """Add codes to a pool; codes already in it are ignored."""
    added = await import_codes(platform.db, pool, body.codes, platform.clock.now())
    async with platform.db.session() as session:
        total, free = await pool_counts(session, pool)
    return PoolPublic(pool=pool, total=total, free=free, added=added)


@router.get("/promo-pools/{pool}", response_model=PoolPublic, **roles(MARKETING))
async def pool_status(pool: Pool, platform: PlatformDep) -> PoolPublic:
    async with platform.db.session() as session:
        total, free = await pool_counts(session, pool)
    if total == 0:
        raise HTTPException(404, f"pool {pool!r} has no codes")
    return PoolPublic(pool=pool, total=total, free=free)


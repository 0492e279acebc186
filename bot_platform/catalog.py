"""The product catalog: import from CSV or JSON, recommendations, tracked links.

Recommendations combine "people who bought what you bought also bought" (from
``order_placed`` events) with rules (category, tags, tags taken from the subscriber's
attributes such as a quiz result); out-of-stock and already-bought products never appear.
Every product link carries utm parameters and a click id; with a public URL configured the
link goes through ``/r/<click id>``, which counts the click and redirects.
"""

from __future__ import annotations

import csv
import io
import json
import secrets
from collections import Counter
from collections.abc import Iterable
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from bot_platform.database import Database
from bot_platform.models import CustomerEvent, KeyValue, Product, TrackedLink
from bot_platform.text import StorableJson, text

CO_PURCHASE_ORDERS = 5000  # recent orders looked at for "also bought"
VERSION_KEY = "catalog:version"  # in ``kv``: changes with every product upload


class ProductIn(BaseModel):
    """One product row as imported (CSV columns or JSON keys)."""

    model_config = ConfigDict(extra="ignore")

    sku: text(64, min_length=1)
    title: text(255, min_length=1)
    url: text(1024) = Field(pattern=r"^https?://")
    image_url: text(1024) | None = None
    price: float | None = Field(default=None, ge=-1e15, le=1e15)
    currency: text(8) | None = None
    category: text(64) | None = None
    tags: list[text(64)] = Field(default_factory=list, max_length=100)
    attributes: StorableJson = Field(default_factory=dict)
    in_stock: bool = True

    @field_validator("tags", mode="before")
    @classmethod
    def _split_tags(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [t.strip() for t in value.replace(";", "|").split("|") if t.strip()]
        return value

    @field_validator("attributes", mode="before")
    @classmethod
    def _json_attributes(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return json.loads(value) if value.strip() else {}
            except RecursionError:
                raise ValueError("attributes are nested too deeply") from None
        return value

    @field_validator("image_url", "price", "currency", "category", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("in_stock", mode="before")
    @classmethod
    def _stock_words(cls, value: Any) -> Any:
        if isinstance(value, str):
            return value.strip().lower() not in ("0", "false", "no", "n", "")
        return value


def parse_products(text: str, filename: str) -> tuple[list[ProductIn], list[str]]:
    """Products from CSV (header row) or JSON (a list of objects); errors per row. A file
    that cannot be read as a whole (bad JSON, nesting too deep, a CSV field over the csv
    module's limit) raises ValueError with one line saying why."""
    rows: list[Any]
    text = text.removeprefix("\ufeff")  # a byte-order mark (Excel's "CSV UTF-8")
    if filename.lower().endswith(".json"):
        try:
            rows = json.loads(text)
        except RecursionError:
            raise ValueError("the JSON is nested too deeply") from None
        if not isinstance(rows, list):
            return [], [f"{filename}: a JSON catalog is a list of products"]
    else:
        reader = csv.DictReader(io.StringIO(text))
        try:
            rows = list(reader)
        except csv.Error as error:
            raise ValueError(f"line {reader.line_num}: {error}") from None
    products, errors = [], []
    for number, row in enumerate(rows, start=1):
        try:
            products.append(ProductIn.model_validate(row))
        except ValidationError as error:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                 for e in error.errors())
            errors.append(f"{filename}: row {number}: {problems}")
    return products, errors


async def upsert_products(db: Database, products: Iterable[ProductIn], now: datetime) -> int:
    """Insert new products and update known ones (by sku) in one statement per batch, so
    concurrent uploads of the same sku both succeed; a sku named twice in one upload is
    written once, from its last row. Returns how many products were written."""
    latest = {item.sku: {**item.model_dump(), "updated_at": now} for item in products}
    rows = list(latest.values())
    async with db.session() as session:
        if session.bind.dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        for first in range(0, len(rows), 500):
            statement = insert(Product).values(rows[first:first + 500])
            statement = statement.on_conflict_do_update(
                index_elements=[Product.sku],
                set_={name: statement.excluded[name] for name in rows[0] if name != "sku"})
            await session.execute(statement)
        await bump_version(session, now)
    return len(rows)


async def bump_version(session: AsyncSession, now: datetime) -> None:
    """Mark the catalog changed, in the transaction that changes it: every process's AI
    knowledge compares this mark (see ``catalog_stamp``) and rebuilds when it moved. A
    random mark, not a time: two changes within one clock tick still differ."""
    if session.bind.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    value = secrets.token_hex(8)
    statement = insert(KeyValue).values(key=VERSION_KEY, value=value, updated_at=now)
    await session.execute(statement.on_conflict_do_update(
        index_elements=[KeyValue.key], set_={"value": value, "updated_at": now}))


async def catalog_stamp(session: AsyncSession) -> tuple[Any, ...]:
    """What changes whenever the products do: the version mark, and (for rows written
    around ``upsert_products``) the row count and the newest ``updated_at``."""
    mark = await session.scalar(select(KeyValue.value).where(KeyValue.key == VERSION_KEY))
    count, newest = (await session.execute(
        select(func.count(Product.id), func.max(Product.updated_at)))).one()
    return mark, count, newest


def skus_of(data: dict[str, Any]) -> list[str]:
    """The skus an order event names: ``{"skus": [...]}`` or ``{"items": [{"sku": ...}]}``."""
    if isinstance(data.get("skus"), list):
        return [str(s) for s in data["skus"]]
    return [str(i["sku"]) for i in data.get("items", []) if isinstance(i, dict) and "sku" in i]


async def recommend(
    session: AsyncSession, *, contact_id: int, limit: int, category: str | None = None,
    tags: Iterable[str] = (), co_purchase: bool = True,
) -> list[Product]:
    """Up to ``limit`` in-stock products this contact has not bought."""
    orders = (await session.execute(
        select(CustomerEvent.contact_id, CustomerEvent.data).where(
            CustomerEvent.name == "order_placed", CustomerEvent.contact_id.is_not(None))
        .order_by(CustomerEvent.id.desc()).limit(CO_PURCHASE_ORDERS))).all()
    baskets: dict[int, set[str]] = {}
    for owner, data in orders:
        baskets.setdefault(owner, set()).update(skus_of(data or {}))
    bought = baskets.pop(contact_id, set())
    scores: Counter[str] = Counter()
    if co_purchase and bought:
        for basket in baskets.values():
            if basket & bought:
                scores.update(basket - bought)
    wanted_tags = {t.casefold() for t in tags if t}
    query = select(Product).where(Product.in_stock.is_(True))
    if category:
        query = query.where(Product.category == category)
    candidates = [p for p in (await session.scalars(query.order_by(Product.id))).all()
                  if p.sku not in bought]
    by_sku = {p.sku: p for p in candidates}
    chosen = [by_sku[sku] for sku, _ in scores.most_common() if sku in by_sku]

    def tag_score(product: Product) -> int:
        return len(wanted_tags & {str(t).casefold() for t in product.tags or []})

    if wanted_tags:
        ranked = sorted((p for p in candidates if tag_score(p) > 0),
                        key=lambda p: (-tag_score(p), p.id))
    else:
        ranked = candidates if not chosen else []
    for product in ranked:
        if product not in chosen:
            chosen.append(product)
    return chosen[:limit]


def with_query(url: str, **params: str) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    query.update({k: v for k, v in params.items() if v})
    return urlunsplit(parts._replace(query=urlencode(query)))


async def tracked_link(
    session: AsyncSession, *, url: str, subscriber_id: int, channel: str, campaign: str,
    now: datetime, public_url: str | None, sku: str | None = None, flow: str | None = None,
    broadcast_id: int | None = None,
) -> str:
    """A link with utm parameters and a click id; through ``/r/`` when we are reachable."""
    token = secrets.token_urlsafe(9)
    target = with_query(url, utm_source="botp", utm_medium=channel, utm_campaign=campaign,
                        botp_click=token)
    session.add(TrackedLink(token=token, subscriber_id=subscriber_id, url=target, flow=flow,
                            sku=sku, broadcast_id=broadcast_id, created_at=now))
    if public_url:
        return f"{public_url.rstrip('/')}/r/{token}"
    return target


async def register_click(db: Database, token: str, now: datetime) -> str | None:
    """Count a click; returns where to redirect (None for an unknown token)."""
    async with db.session() as session:
        link = await session.get(TrackedLink, token)
        if link is None:
            return None
        link.clicks += 1
        link.first_clicked_at = link.first_clicked_at or now
        return link.url

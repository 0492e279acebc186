"""Admin API keys: ``botp_<prefix>_<secret>``, stored as a SHA-256 hash (the secret has
192 random bits, so a slow hash would buy nothing) and compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select

from bot_platform.database import Database
from bot_platform.models import ApiKey

ROLES = ("admin", "marketer", "agent")


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling the admin API."""

    key_id: int
    name: str
    role: str


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


async def create_key(db: Database, *, name: str, role: str, now: datetime) -> tuple[int, str]:
    """Create a key; returns (id, the key). The key is not stored and cannot be shown again."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r} (roles: {', '.join(ROLES)})")
    prefix = secrets.token_hex(6)
    key = f"botp_{prefix}_{secrets.token_urlsafe(24)}"
    async with db.session() as session:
        row = ApiKey(name=name, role=role, prefix=prefix, key_hash=_hash(key), created_at=now)
        session.add(row)
        await session.flush()
        return row.id, key


async def verify_key(db: Database, key: str, now: datetime) -> Principal | None:
    """The principal of a valid, unrevoked key; None otherwise."""
    parts = key.split("_")
    if len(parts) < 3 or parts[0] != "botp":
        return None
    async with db.session() as session:
        row = await session.scalar(select(ApiKey).where(ApiKey.prefix == parts[1]))
        if row is None or row.revoked_at is not None:
            return None
        if not hmac.compare_digest(row.key_hash, _hash(key)):
            return None
        if row.last_used_at is None or (now - row.last_used_at).total_seconds() > 60:
            row.last_used_at = now  # at most once a minute: no write per request
        return Principal(row.id, row.name, row.role)

"""A tiny durable key-value seam for adapter state (polling offsets, long callback payloads)."""

from __future__ import annotations

from typing import Protocol


class KeyValueStore(Protocol):
    """Durable string keys to string values, shared by every process of the platform."""

    async def get(self, key: str) -> str | None: ...

    async def set(self, key: str, value: str) -> None: ...

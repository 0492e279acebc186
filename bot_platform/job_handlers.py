"""The job handler contract: what the scheduler runs for a job ``kind``.

A plain ``JobHandler`` runs inside the job's transaction. A handler with a slow part (a
network call) declares it by being a ``PreparedJobHandler``; the scheduler checks that with
``isinstance``, not by probing attributes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol, runtime_checkable

from sqlalchemy.ext.asyncio import AsyncSession

from bot_platform.models import Job

JobHandler = Callable[[AsyncSession, Job], Awaitable[str]]


@runtime_checkable
class PreparedJobHandler(Protocol):
    """A handler whose slow part (a network call) runs BEFORE the job's transaction, so
    no database lock is held while it waits; ``apply`` then commits with the job."""

    async def prepare(self, job: Job) -> Any: ...

    async def apply(self, session: AsyncSession, job: Job, prepared: Any) -> str: ...

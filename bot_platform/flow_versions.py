"""Flow versions uploaded through the admin API: which are active, the texts they bring,
and keeping every process (web and worker) on the active ones.

Each process polls the active versions every ``flow_reload_seconds`` (one indexed query of
a small table); when the set changed, it rebuilds its catalogs (files plus the active
versions' texts) and its flows, in place, so the engine, the worker's timers and the API
all use the new ones from their next event on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from bot_platform.database import Database
from bot_platform.models import FlowVersion

if TYPE_CHECKING:  # platform.py imports this module
    from bot_platform.platform import Platform

log = logging.getLogger(__name__)

Texts = dict[str, list[tuple[str, str]]]  # locale -> [(origin, Fluent text)]


async def active_versions(db: Database) -> list[Any]:
    """Rows of (flow, version, text, texts) of the active versions, by flow name."""
    async with db.session() as session:
        return list((await session.execute(select(
            FlowVersion.flow, FlowVersion.version, FlowVersion.text, FlowVersion.texts).where(
            FlowVersion.active.is_(True)).order_by(FlowVersion.flow))).all())


def version_texts(rows: Iterable[Any], extra: Texts | None = None) -> Texts:
    """The texts of these versions (and ``extra`` last, so it wins) by locale."""
    texts: Texts = {}
    for row in rows:
        for locale, source in sorted((row.texts or {}).items()):
            texts.setdefault(locale, []).append((f"{row.flow} v{row.version} texts.{locale}",
                                                 source))
    for locale, items in (extra or {}).items():
        texts.setdefault(locale, []).extend(items)
    return texts


async def reload_flows(platform: Platform) -> bool:
    """Use the active uploaded versions (they replace files of the same name) and their
    texts; returns whether anything changed. Cheap when nothing did."""
    from bot_platform.flows.loading import parse_flow_text, validate_paths
    from bot_platform.flows.machine import FlowSet
    from bot_platform.flows.validation import check_cross_flow

    async with platform.flow_lock:
        active = await active_versions(platform.db)
        signature = tuple((row.flow, row.version) for row in active)
        if signature == platform.flow_signature:
            return False
        catalogs = platform.catalogs.with_texts(version_texts(active))
        base = {str(issue) for issue in platform.catalogs.issues}
        for issue in catalogs.issues:
            if str(issue) not in base:
                log.error("%s", issue)
        specs, _ = validate_paths(platform.settings.flows_dir, catalogs)
        for row in active:
            name = f"{row.flow} v{row.version}"
            spec, issues = parse_flow_text(row.text, name, catalogs)
            if spec is None:
                log.error("active flow %s is invalid now and was skipped: %s", name,
                          "; ".join(str(i) for i in issues))
                continue
            specs[spec.flow] = (spec, name)
        for issue in check_cross_flow(specs):
            log.error("%s", issue)
        platform.catalogs.adopt(catalogs)
        platform.flows = FlowSet([spec for spec, _ in specs.values()], platform.catalogs)
        platform.engine.flows = platform.flows  # started before the first reload
        platform.flow_signature = signature
        log.info("flows in use: %s", ", ".join(sorted(platform.flows.flows)))
        return True


async def watch(platform: Platform, every: float, stop: asyncio.Event) -> None:
    """Follow activations made by other processes until ``stop`` is set."""
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), every)
        except TimeoutError:
            pass
        if stop.is_set():
            return
        try:
            await reload_flows(platform)
        except Exception:  # the database may be away: the next round retries
            log.exception("reloading flows failed")

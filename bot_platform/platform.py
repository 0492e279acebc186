"""The composition root: settings in, a running platform out. Nothing is built at import.

    platform = Platform(settings)          # or Platform(settings, clock=ManualClock())
    await platform.start()                 # database, catalogs, flows, channels, engine
    app = platform.app()                   # webhooks (and the admin API when present)
    await platform.worker.run(stop)        # timers + deliveries
    await platform.close()
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import aiohttp
from sqlalchemy import and_

from bot_platform import broadcasts
from bot_platform.bot_registry import BotRegistry
from bot_platform.channels import Channel, ChannelDeps, SupportsClaimScope
from bot_platform.clock import Clock, SystemClock
from bot_platform.config import BotConfig, Settings
from bot_platform.database import Database, SqlKeyValueStore, idle_timeout_for, listen
from bot_platform.delivery import Delivery
from bot_platform.errors import FlowIssue, FlowValidationError
from bot_platform.flows.loading import validate_paths
from bot_platform.flows.machine import FlowSet
from bot_platform.handoff import SupportHours
from bot_platform.i18n import Catalogs
from bot_platform.inbound import Engine
from bot_platform.jobs import Scheduler
from bot_platform.outbox import WORK_CHANNEL, OutboxQueue
from bot_platform.own_replies import OwnReplies
from bot_platform.ratelimit import (
    ClosableLimiter,
    MemoryRateLimiter,
    RateLimiter,
    RedisRateLimiter,
)
from bot_platform.types import Capabilities
from bot_platform.winback import SCAN_KIND, InactivityScan, ensure_scan
from bot_platform.worker import Worker, new_worker_id

if TYPE_CHECKING:
    from openai import AsyncOpenAI

    from bot_platform.metrics import Metrics

log = logging.getLogger(__name__)


def load_flows(settings: Settings, catalogs: Catalogs) -> FlowSet:
    """Load and validate every flow (and the catalogs: a syntax error or a duplicate key in
    an ``.ftl`` file); refuse to start on an invalid one unless told to skip it
    (``skip_invalid_flows``), and then say which were skipped and why."""
    specs, issues = validate_paths(settings.flows_dir, catalogs)
    errors = _errors(catalogs, issues)
    for issue in issues:
        if issue.severity == "warning":
            log.warning("%s", issue)
    if errors and not settings.skip_invalid_flows:
        raise FlowValidationError(errors)
    for file in sorted({issue.file for issue in errors}):
        reasons = "; ".join(f"{i.path}: {i.message}" for i in errors if i.file == file)
        log.error("skipped invalid flow file %s (%s)", file, reasons)
    return FlowSet([spec for spec, _ in specs.values()], catalogs)


def check_flows(settings: Settings) -> None:
    """Raise ``FlowValidationError`` where ``load_flows`` would, logging nothing: ``botp
    web --processes N`` says it once, before forking, instead of once per process."""
    catalogs = Catalogs.load(settings.locales_dir, settings.default_locale)
    errors = _errors(catalogs, validate_paths(settings.flows_dir, catalogs)[1])
    if errors and not settings.skip_invalid_flows:
        raise FlowValidationError(errors)


def _errors(catalogs: Catalogs, issues: list[FlowIssue]) -> list[FlowIssue]:
    return [*catalogs.issues, *(issue for issue in issues if issue.severity == "error")]


class Platform:
    """Wires settings, database, catalogs, flows, channels, engine and worker."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock | None = None,
        limiter: RateLimiter | None = None,
        channel_overrides: dict[tuple[str, str], Channel] | None = None,
    ) -> None:
        self.settings = settings
        self.clock: Any = clock or SystemClock()
        # With Redis, every worker process draws from the same buckets.
        self.limiter = limiter or (RedisRateLimiter.from_url(settings.redis_url)
                                   if settings.redis_url else MemoryRateLimiter())
        # A frozen process's open transaction ends about when its leases do.
        self.db = Database(settings.database_url, idle_in_transaction_timeout=idle_timeout_for(
            settings.worker.lease_seconds))
        self.kv = SqlKeyValueStore(self.db, self.clock)
        self.channels: dict[tuple[str, str], Channel] = dict(channel_overrides or {})
        self.registry = BotRegistry(settings, self.db, self.channels, self.webhook_url)
        self.bots: dict[tuple[str, str], BotConfig] = self.registry.bots
        self.http: aiohttp.ClientSession | None = None
        self.worker_id = new_worker_id()
        # Whether this process polls bots or registers their webhooks (``botp web
        # --processes N``: only the first of them does; Telegram allows one poller).
        self.registers_bots = True
        # Set when the process is asked to stop: long responses (the live stream) end, or
        # the web server would wait for them forever.
        self.stopping = asyncio.Event()
        self.catalogs: Catalogs
        self.flows: FlowSet
        self.engine: Engine
        self.outbox: OutboxQueue
        self.worker: Worker
        self.replies: OwnReplies
        # The worker's notify, once there is one.
        self._wake: Callable[[str], None] = lambda what: None
        self.metrics: Metrics | None = None  # made by metrics.metrics_of on first use
        self.ai_client: AsyncOpenAI | None = None  # set by start when AI replies are on
        self._flow_watch: asyncio.Task[None] | None = None
        # flow_versions.reload_flows: one reload at a time, and what is loaded now.
        self.flow_lock = asyncio.Lock()
        self.flow_signature: tuple[tuple[str, int], ...] = ()

    async def start(self) -> Platform:
        self.catalogs = Catalogs.load(self.settings.locales_dir, self.settings.default_locale)
        self.flows = load_flows(self.settings, self.catalogs)
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        self.deps = ChannelDeps(http=self.http, kv=self.kv)
        self.registry.build_settings_bots(self.deps)
        await self.refresh_bots()
        self.outbox = OutboxQueue(self.db, self.clock, self.capabilities, self._notify)
        self.engine = Engine(self.db, self.flows, self.catalogs, self.clock,
                             capabilities=self.capabilities, on_commit=self._notify,
                             outbox=self.outbox)
        self.engine.public_url = self.settings.public_url
        # Looked up per event: the engine's handle may be wrapped after start (tests do).
        self.registry.handle = lambda event: self.engine.handle(event)
        support = self.settings.support
        if support.keywords is not None:
            self.engine.handoff.keywords = support.keywords
        if not support.always_open:
            self.engine.handoff.support_hours = SupportHours(
                support.days, support.start_hour, support.end_hour, support.timezone)
        scheduler = Scheduler(self.db, self.engine, self.clock, self.settings.worker,
                              self.worker_id)
        delivery = Delivery(self.db, self.channel, self.bot, self.limiter, self.clock,
                            self.settings.worker, self.worker_id)
        delivery.pressure = self.engine.pressure  # broadcasts yield to this process's turns
        if self.db.gate is not None:  # and, for SQLite's one connection, all bulk sessions
            self.db.before_bulk = self.engine.pressure.yield_to_interactive
        # A channel may keep some of its rows from this process (the console: a terminal
        # user's messages are shown only by that user's ``botp chat``).
        scopes = [adapter.claim_scope for adapter in self.channels.values()
                  if isinstance(adapter, SupportsClaimScope)]
        if scopes:
            delivery.claim_scope = and_(*scopes)
        self.worker = Worker(scheduler, delivery, self.settings.worker.poll_interval,
                             on_idle=self.housekeeping,
                             wakeups=None if self.db.is_sqlite else self._listen_for_work)
        self._wake = self.worker.notify
        # A web process on PostgreSQL sends its own turns' replies (``serve.serving``).
        self.replies = OwnReplies(self.engine.turns, delivery, self.db)
        await self.reload_flows()
        scheduler.handlers[SCAN_KIND] = InactivityScan(self.engine)
        scheduler.handlers[broadcasts.SEND_KIND] = broadcasts.SendJob(self.engine)
        await ensure_scan(self.db, self.engine)
        if self.settings.ai.enabled:
            await self._start_ai(scheduler)
        self._watch_flows()
        return self

    async def _start_ai(self, scheduler: Scheduler) -> None:
        """Unexpected text goes to the model (FAQ and catalog as its knowledge, kept
        current from the database and the FAQ files)."""
        from bot_platform.ai.assistant import Assistant, make_client, mask_pii
        from bot_platform.ai.budget import SqlTokenBudget
        from bot_platform.ai.knowledge import LiveKnowledge
        from bot_platform.ai.reply import JOB_KIND, AiReplyJob

        settings = self.settings.ai
        knowledge = LiveKnowledge(self.db, settings.faq_dir, self.settings.default_locale,
                                  settings.knowledge_refresh_seconds, self.clock)
        await knowledge.refresh(force=True)
        self.ai_client = make_client(settings)
        assistant = Assistant(settings, self.ai_client, knowledge.knowledge,
                              SqlTokenBudget(self.db))
        scheduler.handlers[JOB_KIND] = AiReplyJob(self.engine, assistant, knowledge)
        self.engine.router.text_fallback_job = JOB_KIND
        if settings.mask_personal_data:
            self.engine.router.text_fallback_mask = mask_pii

    async def reload_flows(self) -> bool:
        """Use the active uploaded flow versions and their texts (``flow_versions``);
        returns whether anything changed."""
        from bot_platform.flow_versions import reload_flows

        return await reload_flows(self)

    def _watch_flows(self) -> None:
        """Follow flow activations made through any process's API (every process: web
        and worker) within ``flow_reload_seconds``."""
        from bot_platform.flow_versions import watch

        if self.settings.flow_reload_seconds > 0:
            self._flow_watch = asyncio.create_task(
                watch(self, self.settings.flow_reload_seconds, self.stopping))

    async def housekeeping(self) -> None:
        """Between worker rounds: pick up bots and flows changed by other processes."""
        await self.refresh_bots()
        await self.reload_flows()

    async def refresh_bots(self) -> list[BotConfig]:
        """Follow the bots table now (see ``BotRegistry.refresh``)."""
        return await self.registry.refresh()

    async def serve_bots(self, *, receive: bool) -> None:
        """Check, poll or register every bot until cancelled (``BotRegistry.serve``)."""
        await self.registry.serve(receive=receive)

    @property
    def bot_status(self) -> dict[tuple[str, str], str]:
        return self.registry.status

    async def _listen_for_work(self, stop: asyncio.Event) -> None:
        """Workers on PostgreSQL wake when another process queues messages."""
        await listen(self.settings.database_url, WORK_CHANNEL, self._notify, stop,
                     on_share=self._share)

    def _share(self, index: int, count: int) -> None:
        self.worker.delivery.outbox.share = (index, count)

    def _notify(self, what: str = "") -> None:
        self._wake(what)

    def channel(self, channel: str, bot_id: str) -> Channel | None:
        return self.channels.get((channel, bot_id))

    def bot(self, channel: str, bot_id: str) -> BotConfig | None:
        return self.bots.get((channel, bot_id))

    def capabilities(self, channel: str, bot_id: str) -> Capabilities:
        adapter = self.channel(channel, bot_id)
        return adapter.capabilities if adapter is not None else Capabilities()

    def app(self) -> Any:
        from bot_platform.app import create_app

        return create_app(self)

    async def drain(self) -> int:
        """Run due timers and deliveries until nothing is due now."""
        return await self.worker.drain()

    def webhook_url(self, bot: BotConfig) -> str | None:
        if not self.settings.public_url:
            return None
        return f"{self.settings.public_url.rstrip('/')}/webhooks/{bot.channel}/{bot.id}"

    async def close(self) -> None:
        self.stopping.set()
        if self._flow_watch is not None:
            # Awaited, not only cancelled: a reload caught mid-query by the database's
            # close below would wait forever for a connection that is gone.
            self._flow_watch.cancel()
            await asyncio.gather(self._flow_watch, return_exceptions=True)
        await self.registry.close()
        if self.http is not None:
            await self.http.close()
        if self.ai_client is not None:
            await self.ai_client.close()
        if isinstance(self.limiter, ClosableLimiter):
            await self.limiter.close()
        if hasattr(self, "engine"):  # started
            await self.engine.groups.close()
        await self.db.close()
        await asyncio.sleep(0)

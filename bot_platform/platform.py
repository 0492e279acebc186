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
from functools import partial
from typing import Any

import aiohttp
from sqlalchemy import and_

from bot_platform import broadcasts
from bot_platform.channels import Channel, ChannelDeps, load_channel_factory
from bot_platform.clock import Clock, SystemClock
from bot_platform.config import BotConfig, Settings
from bot_platform.database import Database, SqlKeyValueStore, listen
from bot_platform.delivery import Delivery
from bot_platform.engine import WORK_CHANNEL, Engine, SupportHours
from bot_platform.errors import FlowValidationError
from bot_platform.flow_dsl import validate_paths
from bot_platform.flow_runtime import FlowSet
from bot_platform.i18n import Catalogs
from bot_platform.jobs import Scheduler
from bot_platform.ratelimit import MemoryRateLimiter, RateLimiter, RedisRateLimiter
from bot_platform.types import Capabilities
from bot_platform.winback import SCAN_KIND, InactivityScan, ensure_scan
from bot_platform.worker import Worker, new_worker_id

log = logging.getLogger(__name__)


def load_flows(settings: Settings, catalogs: Catalogs) -> FlowSet:
    """Load and validate every flow; refuse to start on an invalid one unless told to skip
    it (``skip_invalid_flows``), and then say which were skipped and why."""
    specs, issues = validate_paths(settings.flows_dir, catalogs)
    errors = [issue for issue in issues if issue.severity == "error"]
    for issue in issues:
        if issue.severity == "warning":
            log.warning("%s", issue)
    if errors and not settings.skip_invalid_flows:
        raise FlowValidationError(errors)
    for file in sorted({issue.file for issue in errors}):
        reasons = "; ".join(f"{i.path}: {i.message}" for i in errors if i.file == file)
        log.error("skipped invalid flow file %s (%s)", file, reasons)
    return FlowSet([spec for spec, _ in specs.values()], catalogs)


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
        self.db = Database(settings.database_url)
        self.kv = SqlKeyValueStore(self.db, self.clock)
        self.channels: dict[tuple[str, str], Channel] = dict(channel_overrides or {})
        self.bots: dict[tuple[str, str], BotConfig] = {
            (bot.channel, bot.id): bot for bot in settings.all_bots()}
        self.http: aiohttp.ClientSession | None = None
        self.worker_id = new_worker_id()
        # Set when the process is asked to stop: long responses (the live stream) end, or
        # the web server would wait for them forever.
        self.stopping = asyncio.Event()
        self.catalogs: Catalogs
        self.flows: FlowSet
        self.engine: Engine
        self.worker: Worker

    async def start(self) -> Platform:
        self.catalogs = Catalogs.load(self.settings.locales_dir, self.settings.default_locale)
        self.flows = load_flows(self.settings, self.catalogs)
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        self.deps = ChannelDeps(http=self.http, kv=self.kv, clock=self.clock,
                                public_url=self.settings.public_url)
        for key, bot in self.bots.items():
            if key not in self.channels:
                self.channels[key] = load_channel_factory(bot.channel)(bot, self.deps)
        await self.refresh_bots()
        self.engine = Engine(self.db, self.flows, self.catalogs, self.clock,
                             capabilities=self.capabilities, on_commit=self._notify)
        self.engine.public_url = self.settings.public_url
        support = self.settings.support
        if support.keywords is not None:
            self.engine.handoff_keywords = support.keywords
        if not support.always_open:
            self.engine.support_hours = SupportHours(
                support.days, support.start_hour, support.end_hour, support.timezone)
        scheduler = Scheduler(self.db, self.engine, self.clock, self.settings.worker,
                              self.worker_id)
        delivery = Delivery(self.db, self.channel, self.bot, self.limiter, self.clock,
                            self.settings.worker, self.worker_id)
        # A channel may keep some of its rows from this process (the console: a terminal
        # user's messages are shown only by that user's ``botp chat``).
        scopes = [scope for adapter in self.channels.values()
                  if (scope := getattr(adapter, "claim_scope", None)) is not None]
        if scopes:
            delivery.claim_scope = and_(*scopes)
        self.worker = Worker(scheduler, delivery, self.settings.worker.poll_interval,
                             on_idle=self.housekeeping,
                             wakeups=None if self.db.is_sqlite else self._listen_for_work)
        await self.reload_flows()
        scheduler.handlers[SCAN_KIND] = InactivityScan(self.engine)
        scheduler.handlers[broadcasts.SEND_KIND] = partial(broadcasts.run_send_job, self.engine)
        await ensure_scan(self.db, self.engine)
        if self.settings.ai.enabled:
            await self._start_ai(scheduler)
        return self

    async def _start_ai(self, scheduler: Scheduler) -> None:
        """Unexpected text goes to the model (FAQ and catalog as its knowledge)."""
        from sqlalchemy import select

        from bot_platform.ai.assistant import Assistant, KvTokenBudget, make_client
        from bot_platform.ai.knowledge import Knowledge
        from bot_platform.ai.reply import JOB_KIND, AiReplyJob
        from bot_platform.models import Product

        async with self.db.session() as session:
            products = [{"title": p.title, "price": p.price, "currency": p.currency,
                         "url": p.url, "description": ", ".join(p.tags or [])}
                        for p in (await session.scalars(select(Product).where(
                            Product.in_stock.is_(True)))).all()]
        settings = self.settings.ai
        knowledge = Knowledge.load(settings.faq_dir, products, self.settings.default_locale)
        self.ai_client = make_client(settings)
        assistant = Assistant(settings, self.ai_client, knowledge, KvTokenBudget(self.kv))
        scheduler.handlers[JOB_KIND] = AiReplyJob(self.engine, assistant)
        self.engine.text_fallback_job = JOB_KIND

    async def reload_flows(self) -> bool:
        """Use the active uploaded flow versions (they replace files of the same name);
        returns whether anything changed. Cheap when nothing did."""
        from sqlalchemy import select

        from bot_platform.flow_dsl import check_cross_flow, parse_flow_text, validate_paths
        from bot_platform.models import FlowVersion

        async with self.db.session() as session:
            active = (await session.execute(select(
                FlowVersion.flow, FlowVersion.version, FlowVersion.text).where(
                FlowVersion.active.is_(True)).order_by(FlowVersion.flow))).all()
        signature = tuple((flow, version) for flow, version, _ in active)
        if signature == getattr(self, "_flow_signature", ()):
            return False
        specs, _ = validate_paths(self.settings.flows_dir, self.catalogs)
        for flow, version, text in active:
            spec, issues = parse_flow_text(text, f"{flow} v{version}", self.catalogs)
            if spec is None:
                log.error("active flow %s v%s is invalid now and was skipped: %s", flow,
                          version, "; ".join(str(i) for i in issues))
                continue
            specs[spec.flow] = (spec, f"{flow} v{version}")
        for issue in check_cross_flow(specs):
            log.error("%s", issue)
        self.flows = FlowSet([spec for spec, _ in specs.values()], self.catalogs)
        if hasattr(self, "engine"):
            self.engine.flows = self.flows
        self._flow_signature = signature
        log.info("flows in use: %s", ", ".join(sorted(self.flows.flows)))
        return True

    async def housekeeping(self) -> None:
        """Between worker rounds: pick up bots and flows changed by other processes."""
        await self.refresh_bots()
        await self.reload_flows()

    async def refresh_bots(self) -> list[BotConfig]:
        """Bring in bots registered through the admin API (by this or another process);
        returns the ones that were new here. Settings' bots take precedence."""
        from sqlalchemy import select

        from bot_platform.models import BotRecord

        async with self.db.session() as session:
            records = (await session.scalars(select(BotRecord))).all()
        added = []
        for record in records:
            key = (record.channel, record.bot_id)
            if not record.enabled:
                if key in self.channels and key not in self._settings_bots():
                    await self._close_channel(self.channels.pop(key))
                    self.bots.pop(key, None)
                continue
            config = BotConfig(
                id=record.bot_id, channel=record.channel, token=record.token,
                secret=record.secret, verify_token=record.verify_token,
                api_base=record.api_base, messages_per_second=record.messages_per_second,
                per_chat_per_second=record.per_chat_per_second, options=record.options)
            if key in self._settings_bots() or self.bots.get(key) == config:
                continue
            if key in self.channels:
                await self._close_channel(self.channels.pop(key))
            self.channels[key] = load_channel_factory(config.channel)(config, self.deps)
            self.bots[key] = config
            added.append(config)
        return added

    def _settings_bots(self) -> set[tuple[str, str]]:
        return {(bot.channel, bot.id) for bot in self.settings.all_bots()}

    async def _close_channel(self, adapter: Channel) -> None:
        close = getattr(adapter, "close", None)
        if close is not None:
            await close()

    async def _listen_for_work(self, stop: asyncio.Event) -> None:
        """Workers on PostgreSQL wake when another process queues messages."""
        await listen(self.settings.database_url, WORK_CHANNEL, self._notify, stop)

    def _notify(self) -> None:
        worker = getattr(self, "worker", None)
        if worker is not None:
            worker.notify()

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

    async def setup_webhooks(self) -> None:
        """Register webhooks where a public URL is configured."""
        for key, adapter in self.channels.items():
            bot = self.bots.get(key)
            url = self.webhook_url(bot) if bot else None
            setup = getattr(adapter, "setup", None)
            if url and setup is not None:
                try:
                    await setup(url)
                    log.info("webhook of %s/%s registered", *key)
                except Exception:
                    log.exception("could not register the webhook of %s/%s", *key)

    def pollers(self) -> list[Any]:
        """Coroutines polling bots that cannot receive webhooks (no public URL)."""
        if self.settings.public_url:
            return []
        return [adapter.poll(self.engine.handle) for adapter in self.channels.values()
                if hasattr(adapter, "poll")]

    async def close(self) -> None:
        self.stopping.set()
        for adapter in self.channels.values():
            close = getattr(adapter, "close", None)
            if close is not None:
                try:
                    await close()
                except Exception:  # closing must go on for the rest
                    log.exception("closing %s/%s failed", adapter.name, adapter.bot_id)
        if self.http is not None:
            await self.http.close()
        if getattr(self, "ai_client", None) is not None:
            await self.ai_client.close()
        close_limiter = getattr(self.limiter, "close", None)
        if close_limiter is not None:
            await close_limiter()
        await self.db.close()
        await asyncio.sleep(0)

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
from bot_platform.channels import (
    Channel,
    ChannelDeps,
    SupportsCheck,
    SupportsClaimScope,
    SupportsClose,
    SupportsPolling,
    SupportsSetup,
    connects,
    load_channel_factory,
    redact_secrets,
)
from bot_platform.clock import Clock, SystemClock
from bot_platform.config import BotConfig, Settings
from bot_platform.database import Database, SqlKeyValueStore, idle_timeout_for, listen
from bot_platform.delivery import Delivery
from bot_platform.engine import Engine
from bot_platform.errors import BadToken, FlowValidationError
from bot_platform.flows.loading import validate_paths
from bot_platform.flows.machine import FlowSet
from bot_platform.handoff import SupportHours
from bot_platform.i18n import Catalogs
from bot_platform.jobs import Scheduler
from bot_platform.outbox import WORK_CHANNEL, OutboxQueue
from bot_platform.ratelimit import MemoryRateLimiter, RateLimiter, RedisRateLimiter
from bot_platform.types import Capabilities
from bot_platform.winback import SCAN_KIND, InactivityScan, ensure_scan
from bot_platform.worker import Worker, new_worker_id

log = logging.getLogger(__name__)


def load_flows(settings: Settings, catalogs: Catalogs) -> FlowSet:
    """Load and validate every flow (and the catalogs: a syntax error or a duplicate key in
    an ``.ftl`` file); refuse to start on an invalid one unless told to skip it
    (``skip_invalid_flows``), and then say which were skipped and why."""
    specs, issues = validate_paths(settings.flows_dir, catalogs)
    errors = [*catalogs.issues, *(issue for issue in issues if issue.severity == "error")]
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

    # How often a process compares its bots with the bots table (others' API changes),
    # and the backoff between tries of a bot that cannot connect (seconds).
    BOTS_REFRESH_SECONDS = 2.0
    RETRY_FIRST = 1.0
    RETRY_MAX = 60.0

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
        self.bots: dict[tuple[str, str], BotConfig] = {
            (bot.channel, bot.id): bot for bot in settings.all_bots()}
        self.http: aiohttp.ClientSession | None = None
        self.worker_id = new_worker_id()
        # Bots served here: a task per bot checks it, then polls or registers its webhook.
        self._runners: dict[tuple[str, str], tuple[Channel, asyncio.Task[None]]] = {}
        self._receive: bool | None = None  # set by serve_bots: None = not serving bots
        self._from_db: set[tuple[str, str]] = set()  # bots built from the bots table
        self._bots_lock = asyncio.Lock()
        self.bot_status: dict[tuple[str, str], str] = {}  # "connected: @x" / "failed: why"
        # Set when the process is asked to stop: long responses (the live stream) end, or
        # the web server would wait for them forever.
        self.stopping = asyncio.Event()
        self.catalogs: Catalogs
        self.flows: FlowSet
        self.engine: Engine
        self.outbox: OutboxQueue
        self.worker: Worker

    async def start(self) -> Platform:
        self.catalogs = Catalogs.load(self.settings.locales_dir, self.settings.default_locale)
        self.flows = load_flows(self.settings, self.catalogs)
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        self.deps = ChannelDeps(http=self.http, kv=self.kv)
        for key, bot in self.bots.items():
            if key not in self.channels:
                self.channels[key] = load_channel_factory(bot.channel)(bot, self.deps)
        await self.refresh_bots()
        self.outbox = OutboxQueue(self.db, self.clock, self.capabilities, self._notify)
        self.engine = Engine(self.db, self.flows, self.catalogs, self.clock,
                             capabilities=self.capabilities, on_commit=self._notify,
                             outbox=self.outbox)
        self.engine.public_url = self.settings.public_url
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
        # A channel may keep some of its rows from this process (the console: a terminal
        # user's messages are shown only by that user's ``botp chat``).
        scopes = [adapter.claim_scope for adapter in self.channels.values()
                  if isinstance(adapter, SupportsClaimScope)]
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
        """Bring in bots registered through the admin API (by this or another process) and
        drop the ones disabled or removed there; returns the ones that were new here.
        Settings' bots take precedence. While ``serve_bots`` runs, new bots start polling
        (or get their webhook) and dropped ones stop, at once."""
        from sqlalchemy import select

        from bot_platform.models import BotRecord

        async with self.db.session() as session:
            records = (await session.scalars(select(BotRecord))).all()
        added = []
        failure: Exception | None = None
        async with self._bots_lock:
            seen = set()
            for record in records:
                key = (record.channel, record.bot_id)
                seen.add(key)
                if not record.enabled:
                    await self._drop_db_bot(key)
                    continue
                config = BotConfig(
                    id=record.bot_id, channel=record.channel, token=record.token,
                    secret=record.secret, verify_token=record.verify_token,
                    api_base=record.api_base, messages_per_second=record.messages_per_second,
                    per_chat_per_second=record.per_chat_per_second, options=record.options)
                if key in self._settings_bots() or self.bots.get(key) == config:
                    continue
                try:
                    adapter = load_channel_factory(config.channel)(config, self.deps)
                except Exception as error:  # the others are still brought in
                    failure = failure or error
                    continue
                await self._stop_runner(key)
                if key in self.channels:
                    await self._close_channel(self.channels.pop(key))
                self.channels[key] = adapter
                self.bots[key] = config
                self._from_db.add(key)
                added.append(config)
            for key in self._from_db - seen:  # the row itself is gone
                await self._drop_db_bot(key)
            self._sync_runners()
        if failure is not None:
            raise failure
        return added

    async def _drop_db_bot(self, key: tuple[str, str]) -> None:
        if key not in self._from_db or key in self._settings_bots():
            return
        await self._stop_runner(key)
        adapter = self.channels.pop(key, None)
        if adapter is not None:
            await self._close_channel(adapter)
        self.bots.pop(key, None)
        self._from_db.discard(key)
        self.bot_status.pop(key, None)
        log.info("stopped: %s bot %s (disabled or removed through the API)", *key)

    # ---- serving bots: checks, pollers, webhooks ------------------------------------------

    async def serve_bots(self, *, receive: bool) -> None:
        """Until cancelled: check every bot (and log ``connected: ...`` or why not), and in
        a process that receives (``receive``: web) poll it or register its webhook; every
        ``BOTS_REFRESH_SECONDS``, follow the bots table, so a bot registered or removed
        through the API in any process starts or stops here too, without a restart."""
        self._receive = receive
        try:
            async with self._bots_lock:
                self._sync_runners()
            while True:
                await asyncio.sleep(self.BOTS_REFRESH_SECONDS)
                try:
                    await self.refresh_bots()
                except Exception:  # a database hiccup: the next round tries again
                    log.exception("following the bots table failed")
        finally:
            self._receive = None
            for key in list(self._runners):
                await self._stop_runner(key)

    def _sync_runners(self) -> None:
        """A runner for every bot without one (while serving bots)."""
        if self._receive is None:
            return
        for key, adapter in self.channels.items():
            runner = self._runners.get(key)
            if runner is not None and runner[0] is adapter and not runner[1].done():
                continue
            if not connects(adapter):
                continue  # the console: nothing to connect to
            task = asyncio.create_task(self._run_bot(key, adapter),
                                       name=f"bot {key[0]}/{key[1]}")
            self._runners[key] = (adapter, task)

    async def _stop_runner(self, key: tuple[str, str]) -> None:
        runner = self._runners.pop(key, None)
        if runner is None:
            return
        task = runner[1]
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # we are being cancelled ourselves
        except Exception:  # it had failed: it is stopped either way
            pass

    async def _run_bot(self, key: tuple[str, str], adapter: Channel) -> None:
        """Check the bot, then poll it (no public URL) or register its webhook; whatever
        fails is logged, naming the bot (never its token), and tried again with backoff:
        a poller that dies is restarted."""
        channel, bot_id = key
        delay = self.RETRY_FIRST
        while True:
            stage = "start-up check"
            try:
                if isinstance(adapter, SupportsCheck):
                    name = await adapter.check()
                    self.bot_status[key] = f"connected: {name}"
                    log.info("connected: %s (%s, bot id %s)", name, channel, bot_id)
                delay = self.RETRY_FIRST
                if not self._receive:
                    return
                bot = self.bots.get(key)
                url = self.webhook_url(bot) if bot is not None else None
                if url is not None:
                    if isinstance(adapter, SupportsSetup):
                        stage = "webhook registration"
                        await adapter.setup(url)
                        log.info("webhook of %s/%s registered: %s", channel, bot_id, url)
                    return
                if not isinstance(adapter, SupportsPolling):
                    return
                stage = "poller"
                log.info("polling: %s bot %s (no public URL: BOTP_PUBLIC_URL unset)",
                         channel, bot_id)
                await adapter.poll(self.engine.handle)
                raise RuntimeError("the poller returned")
            except asyncio.CancelledError:
                raise
            except BadToken as error:
                self.bot_status[key] = f"failed: {error}"
                log.error("failed: %s; replace the token (PATCH /api/bots/%s/%s or "
                          "settings); trying again in %.0f s", redact_secrets(str(error)),
                          channel, bot_id, delay)
            except Exception as error:
                reason = redact_secrets(f"{type(error).__name__}: {error}")
                self.bot_status[key] = f"failed: {reason}"
                if stage == "poller":
                    log.error("the poller of %s bot %s died (%s); restarting it in %.0f s",
                              channel, bot_id, reason, delay, exc_info=True)
                else:
                    log.warning("failed: %s bot %s: %s failed (%s); retrying in %.0f s",
                                channel, bot_id, stage, reason, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.RETRY_MAX)

    def _settings_bots(self) -> set[tuple[str, str]]:
        return {(bot.channel, bot.id) for bot in self.settings.all_bots()}

    async def _close_channel(self, adapter: Channel) -> None:
        if isinstance(adapter, SupportsClose):
            await adapter.close()

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

    async def close(self) -> None:
        self.stopping.set()
        if getattr(self, "_flow_watch", None) is not None:
            # Awaited, not only cancelled: a reload caught mid-query by the database's
            # close below would wait forever for a connection that is gone.
            self._flow_watch.cancel()
            await asyncio.gather(self._flow_watch, return_exceptions=True)
        for key in list(self._runners):
            await self._stop_runner(key)
        for adapter in self.channels.values():
            if isinstance(adapter, SupportsClose):
                try:
                    await adapter.close()
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

"""The live bot registry: which bots this process serves, and serving them.

Settings' bots are fixed; bots registered through the admin API (the bots table) come and
go while the process runs. A task per bot checks it (``connected: @name`` or why not) and
then polls it or registers its webhook, with backoff when that fails. Kept apart from the
composition root so that wiring and the bots' life cycle each have one owner.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from sqlalchemy import select

from bot_platform.channels import (
    Channel,
    ChannelDeps,
    InboundHandler,
    SupportsCheck,
    SupportsClose,
    SupportsPolling,
    SupportsSetup,
    connects,
    load_channel_factory,
)
from bot_platform.config import BotConfig, Settings
from bot_platform.database import Database
from bot_platform.errors import BadToken
from bot_platform.models import BotRecord
from bot_platform.redaction import redact_secrets

log = logging.getLogger(__name__)

BotKey = tuple[str, str]


class BotRegistry:
    """The bots of one process (keyed ``(channel, bot_id)``) and their runners."""

    # How often a process compares its bots with the bots table (others' API changes),
    # and the backoff between tries of a bot that cannot connect (seconds).
    BOTS_REFRESH_SECONDS = 2.0
    RETRY_FIRST = 1.0
    RETRY_MAX = 60.0

    def __init__(
        self,
        settings: Settings,
        db: Database,
        channels: dict[BotKey, Channel],
        webhook_url: Callable[[BotConfig], str | None],
    ) -> None:
        self.settings = settings
        self.db = db
        self.channels = channels
        self.bots: dict[BotKey, BotConfig] = {
            (bot.channel, bot.id): bot for bot in settings.all_bots()}
        self.webhook_url = webhook_url
        self.deps: ChannelDeps | None = None  # set by Platform.start (the HTTP session)
        self.handle: InboundHandler | None = None  # what a poller feeds (the engine)
        # Bots served here: a task per bot checks it, then polls or registers its webhook.
        self.runners: dict[BotKey, tuple[Channel, asyncio.Task[None]]] = {}
        self._receive: bool | None = None  # set by serve: None = not serving bots
        self._from_db: set[BotKey] = set()  # bots built from the bots table
        self._lock = asyncio.Lock()
        self.status: dict[BotKey, str] = {}  # "connected: @x" / "failed: why"

    def build_settings_bots(self, deps: ChannelDeps) -> None:
        """Adapters for the settings' bots (those not overridden, e.g. by a test)."""
        self.deps = deps
        for key, bot in self.bots.items():
            if key not in self.channels:
                self.channels[key] = load_channel_factory(bot.channel)(bot, deps)

    def settings_bots(self) -> set[BotKey]:
        return {(bot.channel, bot.id) for bot in self.settings.all_bots()}

    async def refresh(self) -> list[BotConfig]:
        """Bring in bots registered through the admin API (by this or another process) and
        drop the ones disabled or removed there; returns the ones that were new here.
        Settings' bots take precedence. While ``serve`` runs, new bots start polling
        (or get their webhook) and dropped ones stop, at once."""
        assert self.deps is not None, "build_settings_bots first"
        async with self.db.session() as session:
            records = (await session.scalars(select(BotRecord))).all()
        added = []
        failure: Exception | None = None
        async with self._lock:
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
                if key in self.settings_bots() or self.bots.get(key) == config:
                    continue
                try:
                    adapter = load_channel_factory(config.channel)(config, self.deps)
                except Exception as error:  # the others are still brought in
                    failure = failure or error
                    continue
                await self._stop_runner(key)
                if key in self.channels:
                    await close_channel(self.channels.pop(key))
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

    async def _drop_db_bot(self, key: BotKey) -> None:
        if key not in self._from_db or key in self.settings_bots():
            return
        await self._stop_runner(key)
        adapter = self.channels.pop(key, None)
        if adapter is not None:
            await close_channel(adapter)
        self.bots.pop(key, None)
        self._from_db.discard(key)
        self.status.pop(key, None)
        log.info("stopped: %s bot %s (disabled or removed through the API)", *key)

    async def serve(self, *, receive: bool) -> None:
        """Until cancelled: check every bot (and log ``connected: ...`` or why not), and in
        a process that receives (``receive``: web) poll it or register its webhook; every
        ``BOTS_REFRESH_SECONDS``, follow the bots table, so a bot registered or removed
        through the API in any process starts or stops here too, without a restart."""
        self._receive = receive
        try:
            async with self._lock:
                self._sync_runners()
            while True:
                await asyncio.sleep(self.BOTS_REFRESH_SECONDS)
                try:
                    await self.refresh()
                except Exception:  # a database hiccup: the next round tries again
                    log.exception("following the bots table failed")
        finally:
            self._receive = None
            await self.stop_runners()

    async def stop_runners(self) -> None:
        for key in list(self.runners):
            await self._stop_runner(key)

    def _sync_runners(self) -> None:
        """A runner for every bot without one (while serving bots)."""
        if self._receive is None:
            return
        for key, adapter in self.channels.items():
            runner = self.runners.get(key)
            # A runner that ended did its work (the check, the webhook's registration; a
            # poller or a failure retries inside it): run again only for a new adapter,
            # not on every refresh (that re-registered the webhook every 2 s).
            if runner is not None and runner[0] is adapter:
                continue
            if not connects(adapter):
                continue  # the console: nothing to connect to
            task = asyncio.create_task(self._run_bot(key, adapter),
                                       name=f"bot {key[0]}/{key[1]}")
            self.runners[key] = (adapter, task)

    async def _stop_runner(self, key: BotKey) -> None:
        runner = self.runners.pop(key, None)
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

    async def _run_bot(self, key: BotKey, adapter: Channel) -> None:
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
                    self.status[key] = f"connected: {name}"
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
                if not isinstance(adapter, SupportsPolling) or self.handle is None:
                    return
                stage = "poller"
                log.info("polling: %s bot %s (no public URL: BOTP_PUBLIC_URL unset)",
                         channel, bot_id)
                await adapter.poll(self.handle)
                raise RuntimeError("the poller returned")
            except asyncio.CancelledError:
                raise
            except BadToken as error:
                self.status[key] = f"failed: {error}"
                log.error("failed: %s; replace the token (PATCH /api/bots/%s/%s or "
                          "settings); trying again in %.0f s", redact_secrets(str(error)),
                          channel, bot_id, delay)
            except Exception as error:
                reason = redact_secrets(f"{type(error).__name__}: {error}")
                self.status[key] = f"failed: {reason}"
                if stage == "poller":
                    log.error("the poller of %s bot %s died (%s); restarting it in %.0f s",
                              channel, bot_id, reason, delay, exc_info=True)
                else:
                    log.warning("failed: %s bot %s: %s failed (%s); retrying in %.0f s",
                                channel, bot_id, stage, reason, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.RETRY_MAX)

    async def close(self) -> None:
        """Stop every runner and close every adapter (one failing does not stop the rest)."""
        await self.stop_runners()
        for adapter in self.channels.values():
            if isinstance(adapter, SupportsClose):
                try:
                    await adapter.close()
                except Exception:  # closing must go on for the rest
                    log.exception("closing %s/%s failed", adapter.name, adapter.bot_id)


async def close_channel(adapter: Channel) -> None:
    if isinstance(adapter, SupportsClose):
        await adapter.close()

"""Settings, read once from the environment (prefix ``BOTP_``) and an optional ``.env``.

Use ``get_settings()``; tests build ``Settings(...)`` directly and pass it on, so nothing
reads the environment at import time.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from bot_platform.ai.config import AiSettings


class BotConfig(BaseModel):
    """One bot on one messenger. Secrets are ``SecretStr``: never printed or logged."""

    id: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    channel: str
    token: SecretStr | None = None  # Telegram bot token, Viber auth token, FB page token
    secret: SecretStr | None = None  # Telegram webhook secret, Facebook app secret
    verify_token: SecretStr | None = None  # Facebook webhook verification token
    api_base: str | None = None  # messenger API base URL (tests point it at a fake)
    messages_per_second: float | None = None  # overrides the channel's default
    per_chat_per_second: float | None = None
    options: dict[str, Any] = Field(default_factory=dict)


class WorkerSettings(BaseModel):
    """How the scheduler and delivery worker behave."""

    poll_interval: float = 0.5  # seconds between idle polls (work wakes it earlier)
    batch_size: int = 200
    lease_seconds: float = 60.0  # a claimed row is another worker's again after this
    max_attempts: int = 8  # transient failures before a message is given up
    backoff_base: float = 2.0  # seconds; doubles per attempt, with jitter
    backoff_max: float = 3600.0
    concurrency: int = 32  # sends in flight per worker
    job_concurrency: int = 8  # timers (of different subscribers) run at once per worker
    shutdown_grace: float = 15.0  # seconds a stopping worker gives its sends in flight


class SupportSettings(BaseModel):
    """Human handoff: when agents answer, and the words that ask for them."""

    days: tuple[int, ...] = (0, 1, 2, 3, 4)  # 0 = Monday
    start_hour: int = Field(default=9, ge=0, le=23)
    end_hour: int = Field(default=18, ge=1, le=24)
    timezone: str = "UTC"
    always_open: bool = True  # false: outside the hours, customers are told when
    keywords: dict[str, list[str]] | None = None  # per locale ("*": all); None: built-in


class Settings(BaseSettings):
    """Everything the platform reads from its environment."""

    model_config = SettingsConfigDict(
        env_prefix="BOTP_",
        env_file=".env",
        env_nested_delimiter="__",
        extra="ignore",
    )

    database_url: str = Field(
        default="sqlite+aiosqlite:///./data/botp.sqlite3",
        validation_alias=AliasChoices("BOTP_DATABASE_URL", "DATABASE_URL", "database_url"),
    )
    redis_url: str | None = Field(
        default=None, validation_alias=AliasChoices("BOTP_REDIS_URL", "REDIS_URL", "redis_url")
    )
    public_url: str | None = None  # https://bots.example.com -> webhooks are registered
    host: str = "127.0.0.1"
    port: int = 8080
    # ``botp web``: processes sharing the port (PostgreSQL; one per core is the usual)
    web_processes: int = Field(default=1, ge=1, le=256)
    flows_dir: Path = Path("flows")
    locales_dir: Path = Path("locales")
    default_locale: str = "en"
    skip_invalid_flows: bool = False
    # How often every process checks for flow versions activated through the API (0: never)
    flow_reload_seconds: float = 1.0
    bots: list[BotConfig] = Field(default_factory=list)
    # Opens POST /webhooks/console/console to callers sending it in X-Botp-Console-Secret
    # (scripted smoke tests); unset, the console is reachable only through ``botp chat``.
    console_secret: SecretStr | None = None
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    ai: AiSettings = Field(default_factory=AiSettings)
    support: SupportSettings = Field(default_factory=SupportSettings)
    log_level: str = "INFO"
    # "text" (for people) or "json" (one object per line, with bot, channel, subscriber_id)
    log_format: Literal["text", "json"] = "text"
    # Bearer token a Prometheus must send to GET /metrics; unset, only direct callers from
    # loopback or a private network (not through a proxy) may scrape (bot_platform.metrics).
    metrics_token: SecretStr | None = None
    # A `botp worker` (which serves no HTTP otherwise) serves GET /metrics on this port.
    metrics_port: int | None = Field(default=None, ge=1, le=65535)

    @field_validator("bots", mode="before")
    @classmethod
    def _bots_from_json(cls, value: Any) -> Any:
        if isinstance(value, str):
            return json.loads(value) if value.strip() else []
        return value

    def bot(self, channel: str, bot_id: str) -> BotConfig | None:
        for bot in self.all_bots():
            if bot.channel == channel and bot.id == bot_id:
                return bot
        return None

    def all_bots(self) -> list[BotConfig]:
        """Configured bots plus the always-present console bot (whose webhook is open only
        with a secret: ``console_secret`` fills in one the console bot's config lacks)."""
        bots = list(self.bots)
        if not any(b.channel == "console" for b in bots):
            bots.append(BotConfig(id="console", channel="console"))
        if self.console_secret is not None:
            bots = [b.model_copy(update={"secret": self.console_secret})
                    if b.channel == "console" and b.secret is None else b for b in bots]
        return bots


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()

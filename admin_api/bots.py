"""Bots: register a messenger bot, change its limits or token, set up its webhook.
Tokens and secrets are write-only: accepted here, never returned (not even in a 422's
echo of the request), never logged."""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine, Sequence
from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field, SecretStr
from sqlalchemy import select

from admin_api.errors import unprocessable
from admin_api.security import ADMIN, PlatformDep, roles
from bot_platform.channels import BUILTIN_CHANNELS, SupportsSetup, messenger_channels
from bot_platform.models import BotRecord
from bot_platform.platform import Platform
from bot_platform.redaction import Redactor

log = logging.getLogger(__name__)

SECRET_FIELDS = frozenset({"token", "secret", "verify_token"})
MASK = "**********"


def _masked(value: Any) -> Any:
    """``value`` with every secret field's value masked, at any depth."""
    if isinstance(value, dict):
        return {key: MASK if key in SECRET_FIELDS else _masked(item)
                for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_masked(item) for item in value]
    return value


def without_secrets(errors: Sequence[Any]) -> list[Any]:
    """Validation errors as FastAPI reports them, minus the secrets their ``input`` echoes
    (a body missing ``bot_id`` would otherwise come back whole, token included)."""
    clean = []
    for error in errors:
        error = dict(error)
        if "input" in error:
            in_secret = any(part in SECRET_FIELDS for part in error.get("loc") or ())
            error["input"] = MASK if in_secret else _masked(error["input"])
        clean.append(error)
    return clean


class NoSecretEchoRoute(APIRoute):
    """Routes of this router re-raise validation errors without the secrets."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as error:
                raise RequestValidationError(without_secrets(error.errors())) from None

        return route


router = APIRouter(prefix="/bots", tags=["bots"], route_class=NoSecretEchoRoute)

# From the channel registry: a messenger added there can be registered here at once.
Channel = Literal[messenger_channels()]  # type: ignore[valid-type]


class BotCreate(BaseModel):
    channel: Channel
    bot_id: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    token: SecretStr = Field(description="Telegram bot token / Viber auth token / "
                                         "Facebook page token (write-only)")
    secret: SecretStr | None = Field(None, description="Telegram webhook secret / "
                                                       "Facebook app secret (write-only)")
    verify_token: SecretStr | None = Field(None, description="Facebook verify token")
    api_base: str | None = None
    messages_per_second: float | None = Field(None, gt=0)
    per_chat_per_second: float | None = Field(None, gt=0)
    options: dict[str, Any] = Field(default_factory=dict)


class BotUpdate(BaseModel):
    token: SecretStr | None = None
    secret: SecretStr | None = None
    verify_token: SecretStr | None = None
    messages_per_second: float | None = Field(None, gt=0)
    per_chat_per_second: float | None = Field(None, gt=0)
    options: dict[str, Any] | None = None


class BotPublic(BaseModel):
    channel: str
    bot_id: str
    source: Literal["settings", "api"]
    enabled: bool
    has_token: bool
    has_secret: bool
    messages_per_second: float | None
    per_chat_per_second: float | None
    webhook_url: str | None
    webhook: str | None = None  # the outcome of registering it, when asked
    created_at: datetime | None = None


def _public(platform: Platform, record: BotRecord, webhook: str | None = None) -> BotPublic:
    config = platform.bot(record.channel, record.bot_id)
    return BotPublic(
        channel=record.channel, bot_id=record.bot_id, source="api", enabled=record.enabled,
        has_token=bool(record.token), has_secret=bool(record.secret),
        messages_per_second=record.messages_per_second,
        per_chat_per_second=record.per_chat_per_second,
        webhook_url=platform.webhook_url(config) if config else None, webhook=webhook,
        created_at=record.created_at)


async def _setup_webhook(platform: Platform, channel: str, bot_id: str) -> str | None:
    config, adapter = platform.bot(channel, bot_id), platform.channel(channel, bot_id)
    url = platform.webhook_url(config) if config else None
    if url is None or not isinstance(adapter, SupportsSetup):
        return None if url is None else "not needed"
    try:
        await adapter.setup(url)
    except Exception as error:  # the messenger's answer, reported to the caller
        log.warning("webhook of %s/%s not registered: %s", channel, bot_id,
                    type(error).__name__)
        return f"failed: {type(error).__name__}"
    return "registered"


@router.post("", status_code=201, response_model=BotPublic, **roles(ADMIN))
async def register(body: BotCreate, platform: PlatformDep) -> BotPublic:
    """Register a bot; with a public URL configured its webhook is set up at once."""
    assert body.channel in BUILTIN_CHANNELS
    if (body.channel, body.bot_id) in platform.registry.settings_bots():
        raise HTTPException(409, "this bot is configured in settings")
    now = platform.clock.now()
    async with platform.db.session() as session:
        exists = await session.scalar(select(BotRecord.id).where(
            BotRecord.channel == body.channel, BotRecord.bot_id == body.bot_id))
        if exists is not None:
            raise HTTPException(409, "this bot is already registered")
        record = BotRecord(
            channel=body.channel, bot_id=body.bot_id, token=body.token.get_secret_value(),
            secret=body.secret.get_secret_value() if body.secret else None,
            verify_token=body.verify_token.get_secret_value() if body.verify_token else None,
            api_base=body.api_base, messages_per_second=body.messages_per_second,
            per_chat_per_second=body.per_chat_per_second, options=body.options,
            created_at=now, updated_at=now)
        session.add(record)
    try:
        await platform.refresh_bots()
    except Exception as error:  # a token the adapter rejects outright
        async with platform.db.session() as session:
            await session.delete(await session.get(BotRecord, record.id))
        redact = Redactor(*(s.get_secret_value() for s in (
            body.token, body.secret, body.verify_token) if s is not None))
        raise unprocessable(f"cannot build this bot: {redact(str(error))}") from None
    webhook = await _setup_webhook(platform, body.channel, body.bot_id)
    return _public(platform, record, webhook)


@router.get("", response_model=list[BotPublic], **roles(ADMIN))
async def list_bots(platform: PlatformDep) -> list[BotPublic]:
    async with platform.db.session() as session:
        records = (await session.scalars(select(BotRecord).order_by(BotRecord.id))).all()
    items = [BotPublic(channel=b.channel, bot_id=b.id, source="settings", enabled=True,
                       has_token=b.token is not None, has_secret=b.secret is not None,
                       messages_per_second=b.messages_per_second,
                       per_chat_per_second=b.per_chat_per_second,
                       webhook_url=platform.webhook_url(b))
             for b in platform.settings.all_bots()]
    return items + [_public(platform, r) for r in records]


async def _record(session: Any, channel: str, bot_id: str) -> BotRecord:
    record = await session.scalar(select(BotRecord).where(
        BotRecord.channel == channel, BotRecord.bot_id == bot_id))
    if record is None:
        raise HTTPException(404, "no such bot registered through the API")
    return record


@router.patch("/{channel}/{bot_id}", response_model=BotPublic, **roles(ADMIN))
async def update_bot(channel: str, bot_id: str, body: BotUpdate,
                     platform: PlatformDep) -> BotPublic:
    """Change limits, options or (write-only) credentials; the bot is rebuilt."""
    async with platform.db.session() as session:
        record = await _record(session, channel, bot_id)
        for name in ("token", "secret", "verify_token"):
            value = getattr(body, name)
            if value is not None:
                setattr(record, name, value.get_secret_value())
        for name in ("messages_per_second", "per_chat_per_second", "options"):
            value = getattr(body, name)
            if value is not None:
                setattr(record, name, value)
        record.updated_at = platform.clock.now()
    await platform.refresh_bots()
    return _public(platform, record)


@router.delete("/{channel}/{bot_id}", status_code=204, **roles(ADMIN))
async def disable_bot(channel: str, bot_id: str, platform: PlatformDep) -> None:
    """Stop serving the bot (its subscribers and history stay)."""
    async with platform.db.session() as session:
        record = await _record(session, channel, bot_id)
        record.enabled = False
        record.updated_at = platform.clock.now()
    await platform.refresh_bots()


@router.post("/{channel}/{bot_id}/webhook", response_model=BotPublic, **roles(ADMIN))
async def setup_webhook(channel: str, bot_id: str,
                        platform: PlatformDep) -> BotPublic:
    """(Re-)register the bot's webhook at its messenger."""
    async with platform.db.session() as session:
        record = await _record(session, channel, bot_id)
    return _public(platform, record, await _setup_webhook(platform, channel, bot_id))

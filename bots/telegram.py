"""Telegram, on aiogram 3: its ``Bot`` (client), types and exceptions. Sends, the hot path
of broadcasts, timers and replies, are posted as JSON on the same client's HTTP session
(``bots.telegram_json``), with aiogram's exceptions and their classification.

Inbound: webhooks checked by ``X-Telegram-Bot-Api-Secret-Token`` (constant time), or long
polling when there is no public URL, with the offset stored durably *after* each update
was handled (a restart neither loses nor replays updates). Updates are parsed with
aiogram's ``Update`` model and normalized; callback queries are answered once handled so
the client's spinner stops.

Outbound: HTML parse mode with every text escaped; inline keyboards (callback data over
64 bytes, ``callback_payload_bytes``, is kept server-side: ``channels.LongPayloads``); URL
buttons; reply keyboards for quick replies (with "share phone"); photos with captions;
carousels as photo cards; texts split at 4096 UTF-16 code units (Telegram's unit: an emoji
counts 2), captions at 1024. Errors become ``SendResult``s: ``TelegramRetryAfter`` ->
retry_after, forbidden -> blocked, bad request or not found -> failed, a refused token ->
failed (logged), network/5xx/anything else -> transient.
"""

from __future__ import annotations

import asyncio
import hmac
import html
import json
import logging
from collections.abc import Sequence
from typing import Any

# isort: off
import bots.lazy_aiogram  # noqa: F401  first: aiogram's models are built when first used

# isort: on
from aiogram import Bot
from aiogram.client.default import DefaultBotProperties
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.client.telegram import TelegramAPIServer
from aiogram.exceptions import (
    ClientDecodeError,
    TelegramAPIError,
    TelegramBadRequest,
    TelegramForbiddenError,
    TelegramNetworkError,
    TelegramNotFound,
    TelegramRetryAfter,
    TelegramServerError,
    TelegramUnauthorizedError,
)
from aiogram.types import (
    CallbackQuery,
    ChatMemberUpdated,
    Update,
)
from pydantic import ValidationError

from bot_platform.channels import (
    ChannelDeps,
    HandledEvent,
    InboundHandler,
    LongPayloads,
    WebhookReply,
    WebhookRequest,
)
from bot_platform.config import BotConfig
from bot_platform.edge import load_json
from bot_platform.errors import BadPayload, BadSignature, BadToken
from bot_platform.fitting import NotOneCall, truncate_utf16
from bot_platform.kv import KeyValueStore
from bot_platform.redaction import Redactor
from bot_platform.text import utf16_len
from bot_platform.types import (
    Capabilities,
    Inbound,
    InboundKind,
    Outgoing,
    Profile,
    SendResult,
)
from bots.telegram_json import JsonSends

log = logging.getLogger(__name__)

TELEGRAM_CAPABILITIES = Capabilities(
    max_text_length=4096, text_units="utf16", max_buttons=24, max_button_title=64,
    callback_payload_bytes=64,
    url_buttons=True, quick_replies=True, max_quick_replies=24, carousels=False,
    max_cards=10, max_card_buttons=3, images=True, max_caption=1024, caption_buttons=True,
    batch_size=1, messages_per_second=30.0,
    per_chat_per_second=1.0, per_chat_burst=3, reply_window=None,
)
CAPTION_LIMIT = TELEGRAM_CAPABILITIES.max_caption or 1024
ALLOWED_UPDATES = ["message", "callback_query", "my_chat_member"]
SECRET_HEADER = "x-telegram-bot-api-secret-token"


def escape(text: str) -> str:
    """Text for HTML parse mode: only <, > and & are special (quotes may stay)."""
    return html.escape(text, quote=False)


_RESPONSE_TYPES: list[type] = []


def _keep_response_types() -> None:
    """aiogram parses every answer as ``Response[T]``, and pydantic caches generic models
    only weakly: without a reference of our own, each API call rebuilds the class and its
    schema (about 7% of a busy worker's CPU). The methods themselves are built here too,
    not during the first call (``bots.lazy_aiogram``). Sends do not use them
    (``bots.telegram_json``)."""
    if _RESPONSE_TYPES:
        return
    from aiogram import methods
    from aiogram.methods.base import Response

    used = (methods.AnswerCallbackQuery, methods.SetWebhook, methods.DeleteWebhook,
            methods.GetUpdates, methods.GetMe)
    for model in used:
        model.model_rebuild()
    _RESPONSE_TYPES.extend(Response[method.__returning__] for method in used)


def _build_update_model() -> None:
    """A receiving bot builds ``Update`` (~0.1 s) before the first update arrives, not
    while answering it: aiogram's models are built on first use (``bots.lazy_aiogram``),
    and a process that only sends never needs this one."""
    Update.model_rebuild()


class TelegramChannel:
    """One Telegram bot."""

    name = "telegram"

    def __init__(self, bot_id: str, bot: Bot, kv: KeyValueStore, *,
                 webhook_secret: str | None = None,
                 capabilities: Capabilities = TELEGRAM_CAPABILITIES,
                 poll_timeout: int = 25) -> None:
        self.bot_id = bot_id
        self.bot = bot
        self.kv = kv
        self.webhook_secret = webhook_secret
        self.capabilities = capabilities
        self.poll_timeout = poll_timeout
        self.payloads = LongPayloads(kv, self.name, capabilities.callback_payload_bytes)
        self.retry_first, self.retry_max = 1.0, 60.0  # seconds between polling retries
        # The token travels in every API URL (``/bot<token>/``): client errors carry it.
        self.redact = Redactor(bot.token, bot.token.partition(":")[2], webhook_secret)
        self.sends = JsonSends(bot)
        _keep_response_types()

    # ---- inbound -----------------------------------------------------------------------

    async def parse(self, request: WebhookRequest) -> list[Inbound]:
        if request.method != "POST":
            raise BadPayload("Telegram webhooks are POST requests")
        given = request.headers.get(SECRET_HEADER, "")
        if not self.webhook_secret or not hmac.compare_digest(given.encode(),
                                                              self.webhook_secret.encode()):
            raise BadSignature("missing or wrong X-Telegram-Bot-Api-Secret-Token")
        data = load_json(request.body)
        if not isinstance(data, dict) or isinstance(data.get("update_id"), bool) or \
                not isinstance(data.get("update_id"), int):
            raise BadPayload("body is not a Telegram Update (no update_id)")
        try:
            update = Update.model_validate(data, context={"bot": self.bot})
            return await self.normalize(update)
        except ValidationError as error:
            raise BadPayload(f"invalid Update: {error.error_count()} problem(s)") from error

    async def normalize(self, update: Update) -> list[Inbound]:
        """One Update as normalized events ([] for kinds the platform does not use)."""
        event_id = str(update.update_id)
        if update.message is not None:
            return [self._from_message(update.message, event_id)]
        if update.callback_query is not None:
            event = await self._from_callback(update.callback_query, event_id)
            return [event] if event is not None else []
        if update.my_chat_member is not None:
            event = self._from_member(update.my_chat_member, event_id)
            return [event] if event is not None else []
        log.info("telegram %s: update %s of an unused kind ignored", self.bot_id, event_id)
        return []

    def _common(self, chat_id: int, user: Any, event_id: str, date: Any) -> dict[str, Any]:
        profile = Profile(
            first_name=getattr(user, "first_name", None),
            last_name=getattr(user, "last_name", None),
            username=getattr(user, "username", None),
            language=getattr(user, "language_code", None))
        return {"channel": self.name, "bot_id": self.bot_id, "user_id": str(chat_id),
                "event_id": event_id, "profile": profile, "occurred_at": date}

    def _from_message(self, message: Any, event_id: str) -> Inbound:
        common = self._common(message.chat.id, message.from_user, event_id, message.date)
        text = message.text
        if text is not None and (text == "/start" or text.startswith("/start ")):
            ref = text.removeprefix("/start").strip() or None
            return Inbound(kind=InboundKind.START, text=text, ref=ref, **common)
        if message.contact is not None:
            profile = common.pop("profile").model_copy(
                update={"phone": Profile(phone=message.contact.phone_number).phone})
            return Inbound(kind=InboundKind.CONTACT, profile=profile,
                           data={"contact_user_id": message.contact.user_id}, **common)
        if text is not None:
            return Inbound(kind=InboundKind.TEXT, text=text, **common)
        media: dict[str, Any] = {}
        if message.photo:
            media = {"type": "photo", "file_id": message.photo[-1].file_id}
        elif message.document is not None:
            media = {"type": "document", "file_id": message.document.file_id,
                     "file_name": message.document.file_name}
        elif message.location is not None:
            media = {"type": "location", "latitude": message.location.latitude,
                     "longitude": message.location.longitude}
        else:
            media = {"type": message.content_type}
        return Inbound(kind=InboundKind.MEDIA, text=message.caption, data=media, **common)

    async def _from_callback(self, query: CallbackQuery, event_id: str) -> Inbound | None:
        if query.message is None:
            return None
        payload = await self.payloads.restore(query.data or "")
        common = self._common(query.message.chat.id, query.from_user, event_id, None)
        return Inbound(kind=InboundKind.BUTTON, payload=payload,
                       data={"callback_query_id": query.id}, **common)

    def _from_member(self, update: ChatMemberUpdated, event_id: str) -> Inbound | None:
        status = update.new_chat_member.status
        common = self._common(update.chat.id, update.from_user, event_id, update.date)
        if status in ("kicked", "left"):
            return Inbound(kind=InboundKind.UNSUBSCRIBED, **common)
        if status == "member":
            return Inbound(kind=InboundKind.SUBSCRIBED, **common)
        return None

    async def reply(self, request: WebhookRequest,
                    handled: Sequence[HandledEvent]) -> WebhookReply | None:
        """Answer a button press in the webhook's response (Telegram runs a Bot API method
        given as the response body): the spinner stops without a call of our own."""
        queries = [h.inbound for h in handled if h.inbound.data.get("callback_query_id")]
        if not queries:
            return None
        await self.answer_callbacks(queries[1:])  # one method per response; webhooks
        return WebhookReply(body=json.dumps({  # carry one update, so this is rare
            "method": "answerCallbackQuery",
            "callback_query_id": queries[0].data["callback_query_id"]}).encode(),
            content_type="application/json")

    async def answer_callbacks(self, events: Sequence[Inbound]) -> None:
        for event in events:
            query_id = event.data.get("callback_query_id")
            if query_id:
                try:
                    await self.bot.answer_callback_query(query_id)
                except TelegramAPIError as error:  # too late (over 15 s) or already answered
                    log.info("telegram %s: callback %s not answered: %s", self.bot_id,
                             query_id, self.redact(str(error)))

    # ---- polling -----------------------------------------------------------------------

    def _offset_key(self) -> str:
        return f"telegram:{self.bot_id}:offset"

    async def check(self) -> str:
        """Who this bot is (``@username``), from ``getMe``: proves the token and the
        network at start-up. A refused token raises ``BadToken``; a network error is
        raised as it is (the caller retries)."""
        try:
            me = await self.bot.get_me()
        except (TelegramUnauthorizedError, TelegramForbiddenError, TelegramNotFound) as error:
            # A malformed token gets 404 from the Bot API, a wrong one 401.
            raise BadToken(f"telegram bot {self.bot_id}: the token was refused "
                           f"({self.redact(error.message)})") from None
        return f"@{me.username}" if me.username else me.first_name

    async def poll(self, handler: InboundHandler) -> None:
        """Long-poll ``getUpdates`` until cancelled; the offset moves only after an update
        was handled, so a crash re-fetches (and dedupe drops) at most the update in hand.
        A refused token or an unreachable API is logged on every try and retried with
        backoff (``deleteWebhook`` included): a bot whose token is fixed, or whose network
        comes back, starts answering without a restart."""
        _build_update_model()
        webhook_deleted = False
        delay = self.retry_first
        while True:
            try:
                if not webhook_deleted:
                    await self.bot.delete_webhook(drop_pending_updates=False)
                    webhook_deleted = True
                stored = await self.kv.get(self._offset_key())
                offset = int(stored) if stored else None
                updates = await self.bot.get_updates(
                    offset=offset, timeout=self.poll_timeout, allowed_updates=ALLOWED_UPDATES)
            except TelegramRetryAfter as error:
                await asyncio.sleep(error.retry_after)
                continue
            except (TelegramUnauthorizedError, TelegramForbiddenError,
                    TelegramNotFound) as error:
                log.error("telegram %s: the token was refused (%s): polling stopped until "
                          "it is replaced; retrying in %.0f s", self.bot_id,
                          self.redact(error.message), delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_max)
                continue
            except (TelegramNetworkError, TelegramServerError, ClientDecodeError,
                    TimeoutError, OSError) as error:
                log.warning("telegram %s: %s failed (%s); retrying in %.0f s", self.bot_id,
                            "getUpdates" if webhook_deleted else "deleteWebhook",
                            self.redact(f"{type(error).__name__}: {error}"), delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_max)
                continue
            delay = self.retry_first
            for update in updates:
                try:
                    events = await self.normalize(update)
                except (BadPayload, ValidationError) as error:  # skipped, as a webhook gets 400
                    log.warning("telegram bot %s: update %s skipped: %s", self.bot_id,
                                update.update_id, error)
                    await self.kv.set(self._offset_key(), str(update.update_id + 1))
                    continue
                for event in events:
                    await handler(event)
                await self.kv.set(self._offset_key(), str(update.update_id + 1))
                await self.answer_callbacks(events)

    async def setup(self, webhook_url: str) -> None:
        """Register the webhook with our secret."""
        _build_update_model()
        await self.bot.set_webhook(webhook_url, secret_token=self.webhook_secret,
                                   allowed_updates=ALLOWED_UPDATES)

    async def close(self) -> None:
        await self.sends.close()
        await self.bot.session.close()

    # ---- outbound ----------------------------------------------------------------------

    async def _inline(self, buttons: Sequence[Any]) -> dict[str, Any] | None:
        """An inline keyboard, one button a row, as the Bot API's JSON takes it."""
        if not buttons:
            return None
        rows = []
        for button in buttons:
            if button.url:
                rows.append([{"text": button.title, "url": button.url}])
            else:
                # callback_data must be 1-64 bytes: a button with no payload (an agent's)
                # answers with its title.
                data = await self.payloads.shorten(button.payload or button.title)
                rows.append([{"text": button.title, "callback_data": data}])
        return {"inline_keyboard": rows}

    async def _markup(self, message: Outgoing) -> dict[str, Any] | None:
        """The message's ``reply_markup``: buttons, else quick replies as a keyboard."""
        if message.buttons:
            return await self._inline(message.buttons)
        if message.quick_replies:
            keys = [{"text": q.title, "request_contact": True} if q.request == "phone"
                    else {"text": q.title} for q in message.quick_replies]
            rows = [keys[i:i + 3] for i in range(0, len(keys), 3)]
            return {"keyboard": rows, "resize_keyboard": True, "one_time_keyboard": True}
        if message.extras.get("remove_keyboard"):
            return {"remove_keyboard": True}
        return None

    async def send(self, recipient: str, message: Outgoing) -> SendResult:
        """One message; whatever went wrong comes back as a result without the token."""
        return self.redact.result(await self._send_one(recipient, message))

    async def _send_one(self, recipient: str, message: Outgoing) -> SendResult:
        try:
            message_id = await self._send(int(recipient), message)
        except TelegramRetryAfter as error:
            return SendResult.retry(float(error.retry_after), error.message)
        except TelegramForbiddenError as error:
            return SendResult.blocked(error.message)
        except TelegramUnauthorizedError as error:
            log.error("telegram %s: the bot token was rejected", self.bot_id)
            return SendResult.failed(f"unauthorized: {error.message}")
        except (TelegramBadRequest, TelegramNotFound) as error:
            return SendResult.failed(error.message)
        except (TelegramNetworkError, TelegramServerError, ClientDecodeError) as error:
            return SendResult.transient(f"{type(error).__name__}: {error}")
        except TelegramAPIError as error:
            return SendResult.transient(f"{type(error).__name__}: {error.message}")
        except (TimeoutError, OSError) as error:
            return SendResult.transient(f"{type(error).__name__}: {error}")
        except NotOneCall as error:
            return SendResult.failed(f"not fitted to one call: {error}")
        return SendResult.sent(str(message_id))

    async def _send(self, chat_id: int, message: Outgoing) -> int:
        """Render one fitted part in exactly one call (``fit_message`` made it fit: the
        outbox row is this call, so a retry repeats nothing that already arrived)."""
        if message.cards:  # no native carousel: fit_message makes each card a photo
            if len(message.cards) > 1 or message.text or message.image_url:
                raise NotOneCall(f"{len(message.cards)} cards and text or a picture")
            card = message.cards[0]
            caption = "\n".join(x for x in (card.title, card.subtitle) if x)
            markup = await self._inline(card.buttons)
            if card.image_url:
                return await self._post("sendPhoto", chat_id, markup, photo=card.image_url,
                                        caption=escape(truncate_utf16(caption, CAPTION_LIMIT)))
            return await self._post("sendMessage", chat_id, markup,
                                    text=escape(caption or "…"))
        if not (message.text or message.image_url):
            return 0
        markup = await self._markup(message)
        if message.image_url:
            if utf16_len(message.text) > CAPTION_LIMIT:
                raise NotOneCall("a picture with a text longer than a caption")
            return await self._post("sendPhoto", chat_id, markup, photo=message.image_url,
                                    caption=escape(message.text))
        if utf16_len(message.text) > self.capabilities.max_text_length:
            raise NotOneCall("a text longer than one message")
        return await self._post("sendMessage", chat_id, markup, text=escape(message.text))

    async def _post(self, api_method: str, chat_id: int, markup: dict[str, Any] | None,
                    **fields: str) -> int:
        """One send as the Bot API's JSON; empty fields are left out, as aiogram does."""
        params: dict[str, Any] = {"chat_id": chat_id, "parse_mode": "HTML"}
        params.update((key, value) for key, value in fields.items() if value)
        if markup is not None:
            params["reply_markup"] = markup
        return await self.sends.call(api_method, params)


def build(bot: BotConfig, deps: ChannelDeps) -> TelegramChannel:
    """A Telegram channel from its bot config; ``api_base`` points aiogram at another
    Bot API server (a local one, or the tests' fake)."""
    if bot.token is None:
        raise ValueError(f"telegram bot {bot.id!r} needs a token")
    session = AiohttpSession(api=TelegramAPIServer.from_base(bot.api_base)) \
        if bot.api_base else AiohttpSession()
    client = Bot(bot.token.get_secret_value(), session=session,
                 default=DefaultBotProperties(parse_mode="HTML"))
    secret = bot.secret.get_secret_value() if bot.secret else None
    # Per-bot rate overrides (paid broadcasts) are applied by the delivery worker.
    channel = TelegramChannel(bot.id, client, deps.kv, webhook_secret=secret,
                              poll_timeout=int(bot.options.get("poll_timeout", 25)))
    channel.retry_max = float(bot.options.get("retry_max_delay", channel.retry_max))
    channel.retry_first = min(channel.retry_first, channel.retry_max)
    return channel


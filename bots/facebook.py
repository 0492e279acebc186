"""Facebook Messenger: webhooks verified with ``X-Hub-Signature-256`` (HMAC-SHA256 of the
raw body with the app secret, constant-time), the Send API over our injected aiohttp
session at a configurable Graph base URL and version.

The 24-hour standard messaging window is declared as a capability: the delivery worker
skips untagged messages to subscribers whose last message is older (``outside_window``).
``messaging_type`` says why a message is sent: ``RESPONSE`` only for a direct answer to
the customer's message (``Outgoing.in_reply``: queued by the turn that handled it),
``UPDATE`` for everything sent on our own initiative inside the window (broadcasts,
timers, shop events, channel fallbacks, AI answers from a job), and ``MESSAGE_TAG`` with
the message's tag (``Outgoing.outside_window``). An agent's reply (``Outgoing.by_agent``)
is a ``RESPONSE`` inside the window; past it the delivery worker gives it the
``HUMAN_AGENT`` tag (``Capabilities.agent_window_pass``), allowed for 7 days after the
customer's last message.

A pressed quick reply comes back with its payload; the ``user_phone_number`` one comes
back with the phone number as its payload. So a payload of ours that could pass for a
phone number ("+380501234567", "9") is sent behind ``ESCAPED_PAYLOAD`` and read back as
the button it is: only a payload we did not write that has a phone's shape is a contact.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import re
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import aiohttp
from pydantic import ValidationError

from bot_platform.channels import (
    ChannelDeps,
    HandledEvent,
    LongPayloads,
    WebhookReply,
    WebhookRequest,
)
from bot_platform.config import BotConfig
from bot_platform.edge import epoch_ms, expect_dict, expect_str, load_json
from bot_platform.errors import BadPayload, BadSignature, BadToken
from bot_platform.fitting import NotOneCall
from bot_platform.kv import KeyValueStore
from bot_platform.redaction import Redactor
from bot_platform.types import (
    Capabilities,
    Inbound,
    InboundKind,
    Outgoing,
    Profile,
    SendResult,
)

log = logging.getLogger(__name__)

FACEBOOK_CAPABILITIES = Capabilities(
    max_text_length=2000, max_buttons=3, max_button_title=20, callback_payload_bytes=1000,
    url_buttons=True, quick_replies=True, max_quick_replies=13, carousels=True, max_cards=10,
    max_card_buttons=3, images=True, max_caption=0, caption_buttons=False,
    max_button_text=640,  # a button template's text
    batch_size=1, messages_per_second=250.0, per_chat_per_second=math.inf, per_chat_burst=3,
    reply_window=timedelta(hours=24), agent_window_pass="HUMAN_AGENT",
)
BUTTON_TITLE = 20
QUICK_REPLY_TITLE = 20
MAX_QUICK_REPLIES = 13
GET_STARTED = "GET_STARTED"
RATE_LIMIT_CODES = {4, 17, 32, 613}
# A shared phone number: digits (at least 7) with the separators people and Facebook write.
PHONE_SHAPE = re.compile(r"^\+?[\d\s().-]{7,40}$")
ESCAPED_PAYLOAD = "btn:"  # before our quick-reply payloads that a phone would look like


def _phone_shaped(payload: str) -> bool:
    return bool(PHONE_SHAPE.match(payload)) and sum(c.isdigit() for c in payload) >= 7


def quick_reply_payload(payload: str) -> str:
    """A quick-reply payload as sent: escaped when it could be read as a shared phone."""
    if _phone_shaped(payload) or payload.startswith(ESCAPED_PAYLOAD):
        return ESCAPED_PAYLOAD + payload
    return payload


def pressed_quick_reply(payload: str) -> tuple[str | None, str | None]:
    """(button payload, shared phone) of a quick reply that came back: a payload we
    escaped is always a button; an unescaped one of a phone's shape is the number of a
    ``user_phone_number`` quick reply."""
    if payload.startswith(ESCAPED_PAYLOAD):
        return payload[len(ESCAPED_PAYLOAD):], None
    if _phone_shaped(payload):
        return None, payload
    return payload, None


class ForbiddenSignature(BadSignature):
    """Facebook's convention for a bad signature or verify token is 403."""

    status_code = 403


def _id(value: Any, what: str) -> str:
    """A Messenger id as text: a string or an integer (page-scoped ids are digits)."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise BadPayload(f"{what} is {type(value).__name__}, not an id")
    return str(value)


class FacebookChannel:
    """One Facebook Page."""

    name = "facebook"
    capabilities = FACEBOOK_CAPABILITIES

    def __init__(self, bot_id: str, *, page_token: str, app_secret: str, verify_token: str,
                 http: aiohttp.ClientSession, api_base: str = "https://graph.facebook.com",
                 version: str = "v21.0", get_started: str = GET_STARTED,
                 kv: KeyValueStore | None = None) -> None:
        self.bot_id = bot_id
        # Payloads over 1,000 characters are kept server-side (room left for the escape).
        limit = self.capabilities.callback_payload_bytes
        self.payloads = LongPayloads(kv, self.name,
                                     None if limit is None else limit - len(ESCAPED_PAYLOAD))
        self.page_token = page_token
        self.app_secret = app_secret
        self.verify_token = verify_token
        # The page token travels in the query string (``access_token=``): client errors
        # carry the URL, and error bodies may echo it.
        self.redact = Redactor(page_token, app_secret, verify_token)
        self.http = http
        self.api = f"{api_base.rstrip('/')}/{version}"
        self.get_started = get_started

    # ---- inbound -----------------------------------------------------------------------

    async def parse(self, request: WebhookRequest) -> list[Inbound]:
        if request.method == "GET":
            token = request.query.get("hub.verify_token", "")
            if request.query.get("hub.mode") != "subscribe" or not self.verify_token or \
                    not hmac.compare_digest(token.encode(), self.verify_token.encode()):
                raise ForbiddenSignature("webhook verification with a wrong verify token")
            return []
        signature = request.headers.get("x-hub-signature-256", "")
        expected = "sha256=" + hmac.new(self.app_secret.encode(), request.body,
                                        hashlib.sha256).hexdigest()
        if not hmac.compare_digest(signature.encode(), expected.encode()):
            raise ForbiddenSignature("missing or wrong X-Hub-Signature-256")
        body = load_json(request.body)
        if not isinstance(body, dict) or not isinstance(body.get("entry"), list):
            raise BadPayload("body is not a Messenger webhook (no entry list)")
        if body.get("object") != "page":
            log.info("facebook %s: %r webhook ignored", self.bot_id,
                     str(body.get("object"))[:64])
            return []
        events = []
        try:
            for entry in body["entry"]:
                items = expect_dict(entry, "entry", optional=False).get("messaging")
                if items is not None and not isinstance(items, list):
                    raise BadPayload("entry.messaging is not a list")
                for item in items or []:
                    event = self._normalize(expect_dict(item, "messaging event",
                                                        optional=False))
                    if event is not None:
                        events.append(event)
        except ValidationError as error:
            raise BadPayload(f"messaging event: {error.error_count()} invalid value(s)") \
                from error
        return [await self.payloads.restored(event) for event in events]

    def _normalize(self, item: dict[str, Any]) -> Inbound | None:
        sender_id = expect_dict(item.get("sender"), "sender").get("id")
        sender = _id(sender_id, "sender.id") if sender_id is not None else ""
        if not sender:
            return None
        stamp = item.get("timestamp")
        common: dict[str, Any] = {"channel": self.name, "bot_id": self.bot_id,
                                  "user_id": sender, "occurred_at": epoch_ms(stamp),
                                  "profile": Profile()}
        if "message" in item:
            message = expect_dict(item["message"], "message")
            if message.get("is_echo"):
                return None
            mid = expect_str(message.get("mid"), "message.mid")
            event_id = mid or f"{sender}:{stamp}:message"
            text = expect_str(message.get("text"), "message.text")
            quick = expect_dict(message.get("quick_reply"), "quick_reply")
            payload = expect_str(quick.get("payload"), "quick_reply.payload")
            if payload:
                button, phone = pressed_quick_reply(payload)
                if phone is not None:  # a user_phone_number quick reply
                    return Inbound(**{**common, "profile": Profile(phone=phone)},
                                   event_id=event_id, kind=InboundKind.CONTACT)
                return Inbound(**common, event_id=event_id, kind=InboundKind.BUTTON,
                               payload=button, text=text)
            attachments = message.get("attachments")
            if attachments is not None and not isinstance(attachments, list):
                raise BadPayload("message.attachments is not a list")
            if attachments:
                attachment = expect_dict(attachments[0], "attachment")
                media = expect_dict(attachment.get("payload"), "attachment.payload")
                return Inbound(**common, event_id=event_id, kind=InboundKind.MEDIA,
                               text=text, data={
                                   "type": expect_str(attachment.get("type"),
                                                      "attachment.type"),
                                   "url": expect_str(media.get("url"), "attachment url")})
            return Inbound(**common, event_id=event_id, kind=InboundKind.TEXT,
                           text=text or "")
        if "postback" in item:
            postback = expect_dict(item["postback"], "postback")
            mid = expect_str(postback.get("mid"), "postback.mid")
            event_id = mid or f"{sender}:{stamp}:postback"
            referral = expect_str(expect_dict(postback.get("referral"), "referral").get(
                "ref"), "referral.ref")
            payload = expect_str(postback.get("payload"), "postback.payload")
            if payload == self.get_started:
                return Inbound(**common, event_id=event_id, kind=InboundKind.START,
                               ref=referral)
            return Inbound(**common, event_id=event_id, kind=InboundKind.BUTTON,
                           payload=payload,
                           text=expect_str(postback.get("title"), "postback.title"))
        if "referral" in item:
            ref = expect_str(expect_dict(item["referral"], "referral").get("ref"),
                             "referral.ref")
            return Inbound(**common, event_id=f"{sender}:{stamp}:referral",
                           kind=InboundKind.REFERRAL, ref=ref)
        if "read" in item:
            watermark = expect_dict(item["read"], "read").get("watermark")
            return Inbound(**common, event_id=f"{sender}:{watermark}:read",
                           kind=InboundKind.READ, watermark=epoch_ms(watermark))
        if "delivery" in item:
            delivery = expect_dict(item["delivery"], "delivery")
            mids = delivery.get("mids") or []
            if not isinstance(mids, list):
                raise BadPayload("delivery.mids is not a list")
            watermark = delivery.get("watermark")
            moment = epoch_ms(watermark)
            return Inbound(**common, event_id=f"{sender}:{watermark}:delivery",
                           kind=InboundKind.DELIVERED,
                           message_ids=tuple(_id(m, "delivery mid") for m in mids),
                           watermark=None if mids else moment)
        log.info("facebook %s: messaging event of an unused kind ignored: %s", self.bot_id,
                 sorted(str(k)[:64] for k in item
                        if k not in ("sender", "recipient", "timestamp"))[:10])
        return None

    async def reply(self, request: WebhookRequest,
                    handled: Sequence[HandledEvent]) -> WebhookReply | None:
        """The GET verification handshake answers with the challenge."""
        if request.method == "GET":
            return WebhookReply(body=request.query.get("hub.challenge", "").encode())
        return None

    # ---- outbound ----------------------------------------------------------------------

    @staticmethod
    def _button(button: Any) -> dict[str, Any]:
        title = (button.title or "…")[:BUTTON_TITLE]
        if button.url:
            return {"type": "web_url", "url": button.url, "title": title}
        return {"type": "postback", "title": title, "payload": button.payload or title}

    def _body(self, message: Outgoing) -> dict[str, Any]:
        """The Send API ``message`` object of one fitted part: one call. ``fit_message``
        put the picture, text chunks, button templates and carousels in parts of their
        own; a part that still needs two calls raises ``NotOneCall``."""
        caps = self.capabilities
        body: dict[str, Any]
        if message.image_url:
            if message.text or message.buttons or message.cards:
                raise NotOneCall("a picture with text, buttons or cards")
            body = {"attachment": {"type": "image", "payload": {
                "url": message.image_url, "is_reusable": True}}}
        elif message.cards:
            if message.text or message.buttons:
                raise NotOneCall("a carousel with text or buttons")
            elements = []
            for card in message.cards:
                element: dict[str, Any] = {"title": (card.title or "…")[:80]}
                if card.subtitle:
                    element["subtitle"] = card.subtitle[:80]
                if card.image_url:
                    element["image_url"] = card.image_url
                if card.url:
                    element["default_action"] = {"type": "web_url", "url": card.url}
                if card.buttons:
                    element["buttons"] = [self._button(b) for b in card.buttons[:3]]
                elements.append(element)
            body = {"attachment": {"type": "template", "payload": {
                "template_type": "generic", "elements": elements}}}
        elif message.buttons:  # a button template holds 1-3 buttons
            if len(message.buttons) > caps.max_buttons or \
                    len(message.text) > (caps.max_button_text or caps.max_text_length):
                raise NotOneCall("a button template over its limits")
            body = {"attachment": {"type": "template", "payload": {
                "template_type": "button", "text": message.text or "…",
                "buttons": [self._button(b) for b in message.buttons]}}}
        else:
            if len(message.text) > caps.max_text_length:
                raise NotOneCall("a text longer than one message")
            body = {"text": message.text or "…"}
        if message.quick_replies:
            replies = []
            for reply in message.quick_replies:
                if reply.request == "phone":
                    replies.append({"content_type": "user_phone_number"})
                else:
                    title = (reply.title or "…")[:QUICK_REPLY_TITLE]
                    replies.append({"content_type": "text", "title": title,
                                    "payload": quick_reply_payload(reply.payload or title)})
            body["quick_replies"] = replies[:MAX_QUICK_REPLIES]
        return body

    @staticmethod
    def messaging_type(message: Outgoing) -> dict[str, str]:
        """RESPONSE answers the customer's message (a turn's answer, an agent's reply);
        anything we start is UPDATE, or MESSAGE_TAG with its tag (the only way past the
        24-hour window)."""
        if message.outside_window:
            return {"messaging_type": "MESSAGE_TAG", "tag": message.outside_window}
        return {"messaging_type": "RESPONSE" if message.in_reply or message.by_agent
                else "UPDATE"}

    async def send(self, recipient: str, message: Outgoing) -> SendResult:
        """One message; whatever went wrong comes back as a result without the tokens."""
        return self.redact.result(await self._send_one(recipient, message))

    async def _send_one(self, recipient: str, message: Outgoing) -> SendResult:
        try:
            body = self._body(await self.payloads.shortened(message))
        except NotOneCall as error:
            return SendResult.failed(f"not fitted to one call: {error}")
        return await self._post({"recipient": {"id": recipient},
                                 **self.messaging_type(message), "message": body})

    async def _post(self, payload: dict[str, Any]) -> SendResult:
        url = f"{self.api}/me/messages"
        try:
            async with self.http.post(url, params={"access_token": self.page_token},
                                      json=payload) as response:
                try:
                    data = await response.json(content_type=None)
                except ValueError:
                    data = {}
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as error:
            return SendResult.transient(f"{type(error).__name__}: {error}")
        if status == 200 and isinstance(data, dict) and data.get("message_id"):
            return SendResult.sent(str(data["message_id"]))
        return self._error(status, (data or {}).get("error") or {})

    def _error(self, status: int, error: dict[str, Any]) -> SendResult:
        code, subcode = error.get("code"), error.get("error_subcode")
        text = f"({code}/{subcode}) {error.get('message', f'HTTP {status}')}"
        if code == 10 and subcode == 2018278:
            return SendResult.outside_window(text)
        if code == 551 or subcode == 1545041:
            return SendResult.blocked(text)
        if code in RATE_LIMIT_CODES or status == 429:
            return SendResult.retry(60.0, text)
        if code == 190:
            log.error("facebook %s: the page access token was rejected: %s", self.bot_id,
                      self.redact(str(error.get("message"))))
            return SendResult.failed(f"invalid token {text}")
        if code in (1, 2) or status >= 500 or error.get("is_transient"):
            return SendResult.transient(text)
        return SendResult.failed(text)

    async def check(self) -> str:
        """The Page's name, from ``GET /me?fields=id,name`` with the page token: proves
        the token and the network at start-up. A refused token (code 190, 401/403) raises
        ``BadToken``; network errors and 5xx are raised for the caller to retry."""
        async with self.http.get(f"{self.api}/me", params={
                "access_token": self.page_token, "fields": "id,name"}) as response:
            try:
                data = await response.json(content_type=None)
            except ValueError:
                data = {}
            status = response.status
        data = data if isinstance(data, dict) else {}
        error = data.get("error") if isinstance(data.get("error"), dict) else {}
        if error.get("code") == 190 or status in (401, 403):
            raise BadToken(f"facebook bot {self.bot_id}: the page access token was "
                           f"refused ({self.redact(str(error.get('message') or status))})")
        if status != 200 or not data.get("id"):
            raise ConnectionError(self.redact(
                f"GET /me: HTTP {status} {error.get('message') or ''}".strip()))
        return f"{data.get('name') or data['id']} (page {data['id']})"

    async def setup(self, webhook_url: str) -> None:
        """Subscribe the Page to the app's webhook fields (the callback URL itself is set
        in the app dashboard: ``webhook_url``)."""
        fields = "messages,messaging_postbacks,messaging_referrals,message_reads," \
                 "message_deliveries"
        async with self.http.post(f"{self.api}/me/subscribed_apps", params={
                "access_token": self.page_token, "subscribed_fields": fields}) as response:
            if response.status != 200:
                log.error("facebook %s: subscribing the page failed (%s); set %s as the "
                          "callback URL in the app dashboard", self.bot_id, response.status,
                          webhook_url)


def build(bot: BotConfig, deps: ChannelDeps) -> FacebookChannel:
    if bot.token is None or bot.secret is None:
        raise ValueError(f"facebook bot {bot.id!r} needs token (page) and secret (app)")
    assert deps.http is not None
    return FacebookChannel(
        bot.id, page_token=bot.token.get_secret_value(),
        app_secret=bot.secret.get_secret_value(),
        verify_token=bot.verify_token.get_secret_value() if bot.verify_token else "",
        http=deps.http, api_base=bot.api_base or "https://graph.facebook.com",
        version=str(bot.options.get("graph_version", "v21.0")),
        get_started=str(bot.options.get("get_started_payload", GET_STARTED)), kv=deps.kv)


"""Viber: the viberbot package for its message models (``TextMessage``, ``PictureMessage``,
``RichMediaMessage`` ``.to_dict()``) and request models; our own aiohttp client for HTTP.

Why not viberbot's ``Api``: it is synchronous (``requests``, no timeout), hard-codes the
API URL, has no ``broadcast_message``, raises bare ``Exception``s, compares signatures with
``==`` and fails on unknown events. Here every call is async on the injected session (the
event loop never blocks), the base URL is configurable, signatures are compared in constant
time, results are typed ``SendResult``s, and unknown events are logged and acknowledged.

Button presses: keyboard buttons reply with their ``ActionBody`` as the message text; each
keyboard we send carries the payloads it shows in ``tracking_data``, which Viber returns
with the user's reply, so a reply whose text is one of them is a button press.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
from collections.abc import Sequence
from typing import Any

import aiohttp
from pydantic import ValidationError
from viberbot.api.messages import PictureMessage, RichMediaMessage, TextMessage

from bot_platform.channels import ChannelDeps, HandledEvent, WebhookReply, WebhookRequest
from bot_platform.config import BotConfig
from bot_platform.edge import epoch_ms, expect_dict, expect_str, load_json
from bot_platform.errors import BadPayload, BadSignature
from bot_platform.types import (
    Capabilities,
    Inbound,
    InboundKind,
    Outgoing,
    Profile,
    SendResult,
    split_text,
)

log = logging.getLogger(__name__)

VIBER_CAPABILITIES = Capabilities(
    max_text_length=7000, max_buttons=24, max_button_title=250, callback_payload_bytes=250,
    url_buttons=True, quick_replies=True, max_quick_replies=24, carousels=True, max_cards=6,
    max_card_buttons=2, images=True, batch_size=300, messages_per_second=50.0,
    per_chat_per_second=math.inf, per_chat_burst=3, reply_window=None, read_receipts=True,
)
EVENT_TYPES = ["delivered", "seen", "failed", "subscribed", "unsubscribed",
               "conversation_started"]
BLOCKED_STATUSES = {5, 6, 7}  # not registered, not subscribed, account blocked
RETRY_STATUSES = {12}  # too many requests


class ForbiddenSignature(BadSignature):
    status_code = 403


def _id(value: Any, what: str) -> str:
    """A Viber id or token as text: a string or an integer (message tokens are 64-bit)."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise BadPayload(f"{what} is {type(value).__name__}, not an id")
    return str(value)


class ViberChannel:
    """One Viber bot (public account)."""

    # The welcome message travels in the webhook's response: the endpoint holds queued
    # messages back from the worker until ``reply`` has taken it.
    replies_carry_messages = True

    name = "viber"
    capabilities = VIBER_CAPABILITIES

    def __init__(self, bot_id: str, *, token: str, http: aiohttp.ClientSession,
                 api_base: str = "https://chatapi.viber.com/pa", sender_name: str = "Bot",
                 sender_avatar: str | None = None) -> None:
        self.bot_id = bot_id
        self.token = token
        self.http = http
        self.api = api_base.rstrip("/")
        self.sender = {"name": sender_name[:28], **({"avatar": sender_avatar}
                                                    if sender_avatar else {})}

    # ---- inbound -----------------------------------------------------------------------

    async def parse(self, request: WebhookRequest) -> list[Inbound]:
        signature = request.headers.get("x-viber-content-signature", "")
        expected = hmac.new(self.token.encode(), request.body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(signature.encode(), expected.encode()):
            raise ForbiddenSignature("missing or wrong X-Viber-Content-Signature")
        body = load_json(request.body)
        if not isinstance(body, dict) or not isinstance(body.get("event"), str):
            raise BadPayload("body is not a Viber callback (no event)")
        try:
            event = self._normalize(body)
        except ValidationError as error:
            raise BadPayload(f"Viber {body['event']} event: {error.error_count()} "
                             "invalid value(s)") from error
        return [event] if event is not None else []

    def _user(self, data: dict[str, Any]) -> tuple[str, Profile]:
        user = expect_dict(data.get("sender") or data.get("user"), "sender/user")
        name = (expect_str(user.get("name"), "user name") or "").strip()
        first, _, last = name.partition(" ")
        user_id = user.get("id") or data.get("user_id")
        return _id(user_id, "user id") if user_id else "", Profile(
            first_name=first or None, last_name=last or None,
            language=expect_str(user.get("language"), "user language"))

    def _normalize(self, body: dict[str, Any]) -> Inbound | None:
        kind = body["event"]
        if kind == "webhook":
            return None  # the set-up handshake: a 200 is the whole answer
        if kind not in EVENT_TYPES and kind != "message":
            log.info("viber %s: event %r ignored", self.bot_id, kind[:64])
            return None
        token = _id(body["message_token"], "message_token") \
            if body.get("message_token") is not None else ""
        user_id, profile = self._user(body)
        common: dict[str, Any] = {"channel": self.name, "bot_id": self.bot_id,
                                  "user_id": user_id, "profile": profile,
                                  "occurred_at": epoch_ms(body.get("timestamp"))}
        if not user_id:
            raise BadPayload(f"Viber {kind} event without a user")
        event_id = f"{kind}:{token}" if token else f"{kind}:{user_id}:{body.get('timestamp')}"
        if kind == "conversation_started":
            return Inbound(**common, event_id=event_id, kind=InboundKind.START,
                           ref=expect_str(body.get("context"), "context") or None,
                           data={"subscribed": bool(body.get("subscribed"))})
        if kind == "subscribed":
            return Inbound(**common, event_id=event_id, kind=InboundKind.SUBSCRIBED)
        if kind == "unsubscribed":
            return Inbound(**common, event_id=event_id, kind=InboundKind.UNSUBSCRIBED)
        if kind in ("delivered", "seen", "failed"):
            status = {"delivered": InboundKind.DELIVERED, "seen": InboundKind.READ,
                      "failed": InboundKind.FAILED}[kind]
            reason = expect_str(body.get("desc"), "desc")
            return Inbound(**common, event_id=event_id, kind=status, message_ids=(token,),
                           data={"reason": reason} if kind == "failed" else {})
        return self._message(expect_dict(body.get("message"), "message"), common, event_id)

    def _message(self, message: dict[str, Any], common: dict[str, Any],
                 event_id: str) -> Inbound:
        kind = expect_str(message.get("type"), "message type")
        text = expect_str(message.get("text"), "message text")
        if kind == "text":
            text = text or ""
            if text in self._tracked_payloads(message.get("tracking_data")):
                return Inbound(**common, event_id=event_id, kind=InboundKind.BUTTON,
                               payload=text)
            return Inbound(**common, event_id=event_id, kind=InboundKind.TEXT, text=text)
        if kind == "contact":
            contact = expect_dict(message.get("contact"), "contact")
            phone = expect_str(contact.get("phone_number"), "phone_number")
            profile = common.pop("profile").model_copy(
                update={"phone": Profile(phone=phone).phone})
            return Inbound(**common, profile=profile, event_id=event_id,
                           kind=InboundKind.CONTACT)
        data: dict[str, Any] = {"type": kind}
        if message.get("media"):
            data["url"] = expect_str(message["media"], "media")
        location = expect_dict(message.get("location"), "location")
        for key in ("lat", "lon"):
            if isinstance(location.get(key), int | float):
                data[key] = location[key]
        return Inbound(**common, event_id=event_id, kind=InboundKind.MEDIA, text=text,
                       data=data)

    @staticmethod
    def _tracked_payloads(tracking_data: Any) -> list[str]:
        if not expect_str(tracking_data, "tracking_data"):
            return []
        try:
            data = json.loads(tracking_data)
        except (ValueError, RecursionError):  # not ours: plain text, not a button
            return []
        payloads = data.get("payloads") if isinstance(data, dict) else None
        return [p for p in payloads if isinstance(p, str)] if isinstance(payloads, list) \
            else []

    async def reply(self, request: WebhookRequest,
                    handled: Sequence[HandledEvent]) -> WebhookReply | None:
        """Viber delivers the welcome message of ``conversation_started`` as the webhook's
        response body (the user has not subscribed yet, so it cannot be sent otherwise)."""
        for event in handled:
            if event.inbound.kind == InboundKind.START and event.replies and \
                    not event.duplicate:
                body = self._message_body(event.replies[0])[0]
                body["sender"] = self.sender
                return WebhookReply(body=json.dumps(body).encode(),
                                    content_type="application/json",
                                    consumed_outbox_ids=(event.outbox_ids[0],))
        return None

    # ---- outbound ----------------------------------------------------------------------

    def _keyboard(self, message: Outgoing) -> tuple[dict[str, Any] | None, str | None]:
        buttons, payloads = [], []
        for button in message.buttons:
            if button.url:
                buttons.append({"ActionType": "open-url", "ActionBody": button.url,
                                "Text": button.title, "Columns": 6, "Rows": 1})
            else:
                buttons.append({"ActionType": "reply", "ActionBody": button.payload or "",
                                "Text": button.title, "Columns": 6, "Rows": 1})
                payloads.append(button.payload or "")
        for reply in message.quick_replies:
            if reply.request == "phone":
                buttons.append({"ActionType": "share-phone", "ActionBody": "phone",
                                "Text": reply.title, "Columns": 6, "Rows": 1})
                continue
            body = reply.payload or reply.title
            buttons.append({"ActionType": "reply", "ActionBody": body, "Text": reply.title,
                            "Columns": 3, "Rows": 1})
            payloads.append(body)
        if not buttons:
            return None, None
        keyboard = {"Type": "keyboard", "DefaultHeight": False, "Buttons": buttons[:24]}
        return keyboard, json.dumps({"payloads": payloads})

    def _message_body(self, message: Outgoing) -> list[dict[str, Any]]:
        """Viber message dicts (without receiver) for one fitted message, in order."""
        bodies: list[dict[str, Any]] = []
        keyboard, tracking = self._keyboard(message)
        if message.cards:
            columns = []
            for card in message.cards:
                if card.image_url:
                    columns.append({"Columns": 6, "Rows": 3, "ActionType": "open-url",
                                    "ActionBody": card.url or card.image_url,
                                    "Image": card.image_url})
                caption = "\n".join(x for x in (card.title, card.subtitle) if x)
                columns.append({"Columns": 6, "Rows": 2, "Text": caption[:250],
                                "ActionType": "none"})
                for button in card.buttons[:2]:
                    columns.append({"Columns": 6, "Rows": 1, "Text": button.title,
                                    "ActionType": "open-url" if button.url else "reply",
                                    "ActionBody": button.url or button.payload or ""})
            if message.text:
                bodies.append(TextMessage(text=message.text).to_dict())
            bodies.append(RichMediaMessage(rich_media={
                "Type": "rich_media", "ButtonsGroupColumns": 6, "ButtonsGroupRows": 7,
                "BgColor": "#FFFFFF", "Buttons": columns}, min_api_version=2,
                alt_text=message.text or message.cards[0].title).to_dict())
        else:
            if message.image_url:
                caption = message.text if len(message.text) <= 120 else ""
                bodies.append(PictureMessage(media=message.image_url, text=caption).to_dict())
                text = "" if caption else message.text
            else:
                text = message.text
            for chunk in split_text(text, self.capabilities.max_text_length) if text else []:
                bodies.append(TextMessage(text=chunk).to_dict())
        if not bodies:
            bodies.append(TextMessage(text="…").to_dict())
        if keyboard is not None:
            bodies[-1]["keyboard"] = keyboard
            bodies[-1]["tracking_data"] = tracking
        for body in bodies:
            for key in [k for k, v in body.items() if v is None]:
                del body[key]
        return bodies

    async def _call(self, path: str, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        async with self.http.post(f"{self.api}/{path}", json=payload,
                                  headers={"X-Viber-Auth-Token": self.token}) as response:
            try:
                data = await response.json(content_type=None)
            except ValueError:
                data = {}
            return response.status, data if isinstance(data, dict) else {}

    def _result(self, http_status: int, data: dict[str, Any]) -> SendResult:
        if http_status >= 500:
            return SendResult.transient(f"HTTP {http_status}")
        status = data.get("status")
        message = f"({status}) {data.get('status_message', '')}".strip()
        if status == 0:
            return SendResult.sent(str(data.get("message_token")))
        if status in BLOCKED_STATUSES:
            return SendResult.blocked(message)
        if status in RETRY_STATUSES:
            return SendResult.retry(10.0, message)
        if status == 2:
            log.error("viber %s: the auth token was rejected", self.bot_id)
        return SendResult.failed(message)

    async def send(self, recipient: str, message: Outgoing) -> SendResult:
        last = SendResult.failed("nothing to send")
        for body in self._message_body(message):
            try:
                status, data = await self._call("send_message", {
                    "receiver": recipient, "sender": self.sender, **body})
            except (aiohttp.ClientError, TimeoutError) as error:
                return SendResult.transient(f"{type(error).__name__}: {error}")
            last = self._result(status, data)
            if last.message_id is None:
                return last
        return last

    async def send_many(self, recipients: Sequence[str],
                        message: Outgoing) -> dict[str, SendResult]:
        """``broadcast_message``: up to 300 receivers per call; per-receiver failures in
        the answer's ``failed_list`` become their own results."""
        results: dict[str, SendResult] = {}
        bodies = self._message_body(message)
        for start in range(0, len(recipients), self.capabilities.batch_size):
            batch = list(recipients[start:start + self.capabilities.batch_size])
            outcome: dict[str, SendResult] = {}
            for body in bodies:
                try:
                    status, data = await self._call("broadcast_message", {
                        "broadcast_list": batch, "sender": self.sender, **body})
                except (aiohttp.ClientError, TimeoutError) as error:
                    failure = SendResult.transient(f"{type(error).__name__}: {error}")
                    outcome = dict.fromkeys(batch, failure)
                    break
                batch_result = self._result(status, data)
                if batch_result.message_id is None:
                    outcome = dict.fromkeys(batch, batch_result)
                    break
                for failed in data.get("failed_list") or []:
                    receiver = str(failed.get("receiver"))
                    outcome[receiver] = self._result(200, {
                        "status": failed.get("status"),
                        "status_message": failed.get("status_message")})
                for receiver in batch:
                    outcome.setdefault(receiver, batch_result)
                batch = [r for r in batch if outcome[r].message_id is not None]
            results.update(outcome)
        return results

    async def setup(self, webhook_url: str) -> None:
        status, data = await self._call("set_webhook", {
            "url": webhook_url, "event_types": EVENT_TYPES, "send_name": True,
            "send_photo": False})
        if status != 200 or data.get("status") != 0:
            log.error("viber %s: set_webhook failed: %s", self.bot_id,
                      data.get("status_message") or status)


def build(bot: BotConfig, deps: ChannelDeps) -> ViberChannel:
    if bot.token is None:
        raise ValueError(f"viber bot {bot.id!r} needs its auth token")
    assert deps.http is not None
    return ViberChannel(bot.id, token=bot.token.get_secret_value(), http=deps.http,
                        api_base=bot.api_base or "https://chatapi.viber.com/pa",
                        sender_name=str(bot.options.get("sender_name", "Bot")),
                        sender_avatar=bot.options.get("sender_avatar"))

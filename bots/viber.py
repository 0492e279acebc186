"""Viber: the viberbot package for its message models (``TextMessage``, ``PictureMessage``,
``RichMediaMessage`` ``.to_dict()``) and request models; our own aiohttp client for HTTP.

Why not viberbot's ``Api``: it is synchronous (``requests``, no timeout), hard-codes the
API URL, has no ``broadcast_message``, raises bare ``Exception``s, compares signatures with
``==`` and fails on unknown events. Here every call is async on the injected session (the
event loop never blocks), the base URL is configurable, signatures are compared in constant
time, results are typed ``SendResult``s, and unknown events are logged and acknowledged.

Button presses: reply buttons send their ``ActionBody`` (our payload) as the message text;
each keyboard or carousel we send carries the payloads it shows in ``tracking_data``, which
Viber returns with the user's reply, so a reply whose text is one of them is a button press.
Every reply button is ``Silent`` (Viber 6.7+, ``min_api_version`` 2): without it Viber
would post the payload into the chat as the customer's own message.

Carousels are rich media of 6 x 7 cells per card, each card filling its group exactly
(picture 3 rows, caption the rows left, a row per button), every cell with an
``ActionBody``: Viber refuses a button without one (``badData``), and a card that leaves
rows free makes the next one start mid-group. docs/channels/viber.md has the details.
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
    Card,
    Inbound,
    InboundKind,
    Outgoing,
    Profile,
    SendResult,
)

log = logging.getLogger(__name__)

VIBER_CAPABILITIES = Capabilities(
    max_text_length=7000, max_buttons=24, max_button_title=250, callback_payload_bytes=250,
    url_buttons=True, quick_replies=True, max_quick_replies=24, carousels=True, max_cards=6,
    max_card_buttons=2, images=True, max_caption=120, caption_buttons=True, batch_size=300,
    messages_per_second=50.0,
    per_chat_per_second=math.inf, per_chat_burst=3, reply_window=None,
)
EVENT_TYPES = ["delivered", "seen", "failed", "subscribed", "unsubscribed",
               "conversation_started"]
BLOCKED_STATUSES = {5, 6, 7}  # not registered, not subscribed, account blocked
RETRY_STATUSES = {12}  # too many requests


# Viber API levels (``min_api_version``) of what we use. ``Silent`` and rich media came
# with Viber 6.7 (level 2), share-phone with level 3 (the keyboard docs' table).
SILENT_API = 2
RICH_MEDIA_API = 2
SHARE_PHONE_API = 3
CARD_ROWS = 7  # rows of one carousel card (a group of 6 x 7 cells)
CARD_IMAGE_ROWS = 3
MAX_CARD_BUTTONS = 2  # with a picture: 3 + caption 2 + 2 buttons = 7 rows
MAX_CARDS = 6  # rich media holds at most 6 groups
TRACKING_LIMIT = 4096


def _reply_button(title: str, payload: str | None, *, columns: int) -> dict[str, Any]:
    """A reply button that never shows its payload: Viber posts the ActionBody into the
    chat as the customer's message unless the button is ``Silent``."""
    title = (title or "…")[:250]
    return {"ActionType": "reply", "ActionBody": payload or title, "Text": title,
            "Silent": True, "Columns": columns, "Rows": 1}


def _tap(url: str | None, *, fallback: str) -> dict[str, Any]:
    """What tapping a card cell does: open the product, or nothing (``none`` still needs a
    non-empty ActionBody)."""
    if url:
        return {"ActionType": "open-url", "ActionBody": url}
    return {"ActionType": "none", "ActionBody": fallback or "…"}


def _tracking(payloads: list[str]) -> str:
    """``tracking_data`` naming the payloads on screen (Viber returns it with the reply),
    within Viber's 4096 characters: payloads that do not fit are left out (logged)."""
    kept: list[str] = []
    for payload in dict.fromkeys(payloads):
        if len(json.dumps({"payloads": [*kept, payload]})) > TRACKING_LIMIT:
            log.warning("viber: tracking_data full; payload %r left out", payload[:40])
            continue
        kept.append(payload)
    return json.dumps({"payloads": kept})


class ForbiddenSignature(BadSignature):
    status_code = 403


def _id(value: Any, what: str) -> str:
    """A Viber id or token as text: a string or an integer (message tokens are 64-bit)."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise BadPayload(f"{what} is {type(value).__name__}, not an id")
    return str(value)


def keyboard_of(message: Outgoing) -> tuple[dict[str, Any] | None, list[str], int]:
    """The keyboard of a message, the reply payloads it shows and the API level it needs
    (outside the class: it depends on the message alone)."""
    buttons: list[dict[str, Any]] = []
    payloads: list[str] = []
    level = 1
    for button in message.buttons:
        if button.url:
            buttons.append({"ActionType": "open-url", "ActionBody": button.url,
                            "Text": button.title, "Columns": 6, "Rows": 1})
        else:
            buttons.append(_reply_button(button.title, button.payload, columns=6))
            payloads.append(buttons[-1]["ActionBody"])
    for reply in message.quick_replies:
        if reply.request == "phone":
            buttons.append({"ActionType": "share-phone", "ActionBody": "phone",
                            "Text": reply.title, "Columns": 6, "Rows": 1})
            level = max(level, SHARE_PHONE_API)
            continue
        buttons.append(_reply_button(reply.title, reply.payload, columns=3))
        payloads.append(buttons[-1]["ActionBody"])
    if not buttons:
        return None, [], level
    if payloads:
        level = max(level, SILENT_API)
    keyboard = {"Type": "keyboard", "DefaultHeight": False, "Buttons": buttons[:24]}
    return keyboard, payloads, level

def card_cells(card: Card) -> list[dict[str, Any]]:
    """One card = one group of 6 x ``CARD_ROWS`` cells, filled exactly: the picture
    (3 rows, if any), the caption (the rows left) and a row per button. Every cell has
    an ActionBody (Viber requires it, for ``none`` too)."""
    card_buttons = list(card.buttons[:MAX_CARD_BUTTONS])
    cells: list[dict[str, Any]] = []
    caption = "\n".join(x for x in (card.title, card.subtitle) if x) or "…"
    if card.image_url:
        cells.append({"Columns": 6, "Rows": CARD_IMAGE_ROWS, "Image": card.image_url,
                      **_tap(card.url, fallback=card.title or card.image_url)})
    caption_rows = CARD_ROWS - len(cells) * CARD_IMAGE_ROWS - len(card_buttons)
    cells.append({"Columns": 6, "Rows": caption_rows, "Text": caption[:250],
                  "TextVAlign": "middle", "TextHAlign": "left",
                  **_tap(card.url, fallback=caption[:250])})
    for button in card_buttons:
        if button.url:
            cells.append({"Columns": 6, "Rows": 1, "Text": (button.title or "…")[:250],
                          "ActionType": "open-url", "ActionBody": button.url})
        else:
            cells.append(_reply_button(button.title, button.payload, columns=6))
    return cells


class ViberChannel:
    """One Viber bot (public account): a ``Channel`` that ``SupportsSendMany``,
    ``SupportsMessageReply`` (the welcome message), ``SupportsCheck`` and ``SupportsSetup``."""

    name = "viber"
    capabilities = VIBER_CAPABILITIES

    def __init__(self, bot_id: str, *, token: str, http: aiohttp.ClientSession,
                 api_base: str = "https://chatapi.viber.com/pa", sender_name: str = "Bot",
                 sender_avatar: str | None = None, kv: KeyValueStore | None = None) -> None:
        self.bot_id = bot_id
        # An ActionBody holds 250 characters: longer payloads are kept server-side.
        self.payloads = LongPayloads(kv, self.name, self.capabilities.callback_payload_bytes)
        self.token = token
        self.redact = Redactor(token)  # errors and logs never carry the auth token
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
        return [await self.payloads.restored(event)] if event is not None else []

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

    async def reply_with_message(self, request: WebhookRequest,
                                 handled: Sequence[HandledEvent]) -> WebhookReply | None:
        """Viber delivers the welcome message of ``conversation_started`` as the webhook's
        response body (the user has not subscribed yet, so it cannot be sent otherwise)."""
        for event in handled:
            if event.inbound.kind == InboundKind.START and event.replies and \
                    not event.duplicate:
                body = self._body(await self.payloads.shortened(event.replies[0]))
                body["sender"] = self.sender
                return WebhookReply(body=json.dumps(body).encode(),
                                    content_type="application/json",
                                    consumed_outbox_ids=(event.outbox_ids[0],))
        return None

    # ---- outbound ----------------------------------------------------------------------

    def _body(self, message: Outgoing) -> dict[str, Any]:
        """The Viber message dict (without receiver) of one fitted part: one call.
        ``fit_message`` put text, picture and carousel in parts of their own where they
        cannot share a message; a part that still needs two calls raises ``NotOneCall``."""
        keyboard, payloads, level = keyboard_of(message)
        if message.cards:
            if message.text or message.image_url:
                raise NotOneCall("a carousel with text or a picture")
            cells = [cell for card in message.cards[:MAX_CARDS]
                     for cell in card_cells(card)]
            card_payloads = [c["ActionBody"] for c in cells if c["ActionType"] == "reply"]
            body = RichMediaMessage(rich_media={
                "Type": "rich_media", "ButtonsGroupColumns": 6, "ButtonsGroupRows": CARD_ROWS,
                "BgColor": "#FFFFFF", "Buttons": cells}, min_api_version=RICH_MEDIA_API,
                alt_text=(message.cards[0].title or "…")[:7000],
                tracking_data=_tracking(card_payloads) if card_payloads else None).to_dict()
        elif message.image_url:
            if len(message.text) > (self.capabilities.max_caption or 0):
                raise NotOneCall("a picture with a text longer than a caption")
            body = PictureMessage(media=message.image_url, text=message.text).to_dict()
        else:
            if len(message.text) > self.capabilities.max_text_length:
                raise NotOneCall("a text longer than one message")
            body = TextMessage(text=message.text or "…").to_dict()
        if keyboard is not None:
            known = json.loads(body["tracking_data"])["payloads"] \
                if body.get("tracking_data") else []
            body["keyboard"] = keyboard
            body["tracking_data"] = _tracking(known + payloads)
            body["min_api_version"] = max(int(body.get("min_api_version") or 1), level)
        return {k: v for k, v in body.items() if v is not None}

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
        """One message; whatever went wrong comes back as a result without the token."""
        return self.redact.result(await self._send_one(recipient, message))

    async def _send_one(self, recipient: str, message: Outgoing) -> SendResult:
        try:
            body = self._body(await self.payloads.shortened(message))
        except NotOneCall as error:
            return SendResult.failed(f"not fitted to one call: {error}")
        try:
            status, data = await self._call("send_message", {
                "receiver": recipient, "sender": self.sender, **body})
        except (aiohttp.ClientError, TimeoutError) as error:
            return SendResult.transient(f"{type(error).__name__}: {error}")
        return self._result(status, data)

    async def send_many(self, recipients: Sequence[str],
                        message: Outgoing) -> dict[str, SendResult]:
        """``broadcast_message``: up to 300 receivers per call; per-receiver failures in
        the answer's ``failed_list`` become their own results."""
        return self.redact.results(await self._send_batches(recipients, message))

    async def _send_batches(self, recipients: Sequence[str],
                            message: Outgoing) -> dict[str, SendResult]:
        """One call per batch of receivers (a row is in exactly one call)."""
        results: dict[str, SendResult] = {}
        try:
            body = self._body(await self.payloads.shortened(message))
        except NotOneCall as error:
            return dict.fromkeys(recipients, SendResult.failed(
                f"not fitted to one call: {error}"))
        for start in range(0, len(recipients), self.capabilities.batch_size):
            batch = list(recipients[start:start + self.capabilities.batch_size])
            try:
                status, data = await self._call("broadcast_message", {
                    "broadcast_list": batch, "sender": self.sender, **body})
            except (aiohttp.ClientError, TimeoutError) as error:
                results.update(dict.fromkeys(batch, SendResult.transient(
                    f"{type(error).__name__}: {error}")))
                continue
            batch_result = self._result(status, data)
            if batch_result.message_id is not None:
                for failed in data.get("failed_list") or []:
                    receiver = str(failed.get("receiver"))
                    if receiver in batch:
                        results[receiver] = self._result(200, {
                            "status": failed.get("status"),
                            "status_message": failed.get("status_message")})
            for receiver in batch:
                results.setdefault(receiver, batch_result)
        return results

    async def check(self) -> str:
        """The public account's name, from ``get_account_info``: proves the token and the
        network at start-up. A refused token raises ``BadToken``; network errors and 5xx
        are raised for the caller to retry."""
        status, data = await self._call("get_account_info", {})
        if status >= 500:
            raise ConnectionError(f"get_account_info: HTTP {status}")
        if data.get("status") == 2 or status in (401, 403):
            raise BadToken(f"viber bot {self.bot_id}: the auth token was refused "
                           f"({self.redact(str(data.get('status_message') or status))})")
        if status != 200 or data.get("status") != 0:
            raise ConnectionError(self.redact(
                f"get_account_info: ({data.get('status')}) {data.get('status_message')}"))
        uri = data.get("uri")
        return f"{data.get('name') or self.bot_id}" + (f" (viber://pa?chatURI={uri})"
                                                        if uri else "")

    async def setup(self, webhook_url: str) -> None:
        status, data = await self._call("set_webhook", {
            "url": webhook_url, "event_types": EVENT_TYPES, "send_name": True,
            "send_photo": False})
        if status != 200 or data.get("status") != 0:
            log.error("viber %s: set_webhook failed: %s", self.bot_id,
                      self.redact(str(data.get("status_message") or status)))


def build(bot: BotConfig, deps: ChannelDeps) -> ViberChannel:
    if bot.token is None:
        raise ValueError(f"viber bot {bot.id!r} needs its auth token")
    assert deps.http is not None
    return ViberChannel(bot.id, token=bot.token.get_secret_value(), http=deps.http,
                        api_base=bot.api_base or "https://chatapi.viber.com/pa",
                        sender_name=str(bot.options.get("sender_name", "Bot")),
                        sender_avatar=bot.options.get("sender_avatar"), kv=deps.kv)

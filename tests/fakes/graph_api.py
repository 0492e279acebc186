"""A fake Graph API (Messenger Send API) on 127.0.0.1: ``POST /{version}/me/messages``
answers like Facebook (``{"recipient_id", "message_id"}`` or an ``{"error": {...}}``
envelope), records every call with its access token, and can act as if a person is
unavailable, outside the 24-hour window, rate-limited or failing. Reusable by ``bench/``.

Sends are checked against the Send API docs (``check_message``) and refused with a Graph
error (``(#100) ...``, code 100, HTTP 400): ``messaging_type`` RESPONSE / UPDATE /
MESSAGE_TAG, a tag from the allowed list only with MESSAGE_TAG, ``message`` or
``sender_action`` (never both), text 1-2000 characters xor an attachment, at most 13 quick
replies (a ``text`` one with a title of at most 20 characters and a payload of at most
1000), button templates with text of 1-640 characters and 1-3 buttons, generic templates
with 1-10 elements (title 1-80, subtitle at most 80, at most 3 buttons), buttons with a
title of 1-20 characters and a payload of 1-1000 or a valid http(s) URL.

Windows and RESPONSE. The test tells the fake what the person did (``received``, or
``observe`` with the webhook body it posts); the fake's clock can be the platform's
(``clock``). From that it refuses, like Facebook, RESPONSE/UPDATE more than 24 hours after
the person's last message and HUMAN_AGENT/CUSTOMER_FEEDBACK after 7 days (code 10,
subcode 2018278). And, stricter than Facebook (which trusts the sender), RESPONSE is
accepted only while the person's message is being answered: ``received`` opens that
turn, ``settle`` closes every open turn (call it once the direct answers were delivered),
so a broadcast, timer or fallback sent as RESPONSE is refused. (An agent's reply answers
the person who asked for one: a test leaves that turn open.)
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from tests.fakes.server import LoopbackServer

MESSAGING_TYPES = {"RESPONSE", "UPDATE", "MESSAGE_TAG"}
TAGS = {"CONFIRMED_EVENT_UPDATE", "POST_PURCHASE_UPDATE", "ACCOUNT_UPDATE", "HUMAN_AGENT",
        "CUSTOMER_FEEDBACK"}
SEVEN_DAY_TAGS = {"HUMAN_AGENT", "CUSTOMER_FEEDBACK"}
SENDER_ACTIONS = {"typing_on", "typing_off", "mark_seen"}


def _valid_url(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def _check_button(button: Any, where: str) -> str | None:
    if not isinstance(button, dict):
        return f"{where} is not an object"
    title = button.get("title")
    if not isinstance(title, str) or not 1 <= len(title) <= 20:
        return f"{where}[title] must be 1-20 characters"
    kind = button.get("type")
    if kind == "web_url":
        return None if _valid_url(button.get("url")) else f"{where}[url] is not a URL"
    if kind == "postback":
        payload = button.get("payload")
        if not isinstance(payload, str) or not 1 <= len(payload) <= 1000:
            return f"{where}[payload] must be 1-1000 characters"
        return None
    if kind in ("phone_number", "account_link", "account_unlink", "game_play"):
        return None
    return f"{where}[type] {kind!r} is not a button type"


def _check_template(payload: Any) -> str | None:
    if not isinstance(payload, dict):
        return "attachment[payload] is not an object"
    kind = payload.get("template_type")
    if kind == "button":
        text = payload.get("text")
        if not isinstance(text, str) or not 1 <= len(text) <= 640:
            return "button template text must be 1-640 characters"
        buttons = payload.get("buttons")
        if not isinstance(buttons, list) or not 1 <= len(buttons) <= 3:
            return "button template needs 1-3 buttons"
        for index, button in enumerate(buttons):
            if problem := _check_button(button, f"buttons[{index}]"):
                return problem
        return None
    if kind == "generic":
        elements = payload.get("elements")
        if not isinstance(elements, list) or not 1 <= len(elements) <= 10:
            return "generic template needs 1-10 elements"
        for index, element in enumerate(elements):
            where = f"elements[{index}]"
            if not isinstance(element, dict):
                return f"{where} is not an object"
            title = element.get("title")
            if not isinstance(title, str) or not 1 <= len(title) <= 80:
                return f"{where}[title] must be 1-80 characters"
            subtitle = element.get("subtitle")
            if subtitle is not None and (not isinstance(subtitle, str) or len(subtitle) > 80):
                return f"{where}[subtitle] is longer than 80 characters"
            if "image_url" in element and not _valid_url(element["image_url"]):
                return f"{where}[image_url] is not a URL"
            action = element.get("default_action")
            if action is not None and (not isinstance(action, dict) or action.get(
                    "type") != "web_url" or not _valid_url(action.get("url"))
                    or "title" in action):
                return f"{where}[default_action] must be a web_url without a title"
            buttons = element.get("buttons", [])
            if not isinstance(buttons, list) or len(buttons) > 3:
                return f"{where}[buttons] holds at most 3 buttons"
            for number, button in enumerate(buttons):
                if problem := _check_button(button, f"{where}[buttons][{number}]"):
                    return problem
        return None
    return f"template_type {kind!r} is not supported here"


def check_message(body: dict[str, Any]) -> str | None:
    """Why the Send API would refuse this request (before any window rule), or None."""
    recipient = body.get("recipient")
    if not isinstance(recipient, dict) or not recipient.get("id"):
        return "param recipient[id] is required"
    if "sender_action" in body:
        if "message" in body:
            return "sender_action must be sent alone, without message"
        if body["sender_action"] not in SENDER_ACTIONS:
            return f"sender_action must be one of {sorted(SENDER_ACTIONS)}"
        return None
    kind = body.get("messaging_type")
    if kind not in MESSAGING_TYPES:
        return f"param messaging_type must be one of {sorted(MESSAGING_TYPES)}"
    tag = body.get("tag")
    if kind == "MESSAGE_TAG" and tag not in TAGS:
        return f"param tag must be one of {sorted(TAGS)}"
    if kind != "MESSAGE_TAG" and tag is not None:
        return "param tag is only allowed with messaging_type MESSAGE_TAG"
    message = body.get("message")
    if not isinstance(message, dict):
        return "param message is required"
    if ("text" in message) == ("attachment" in message):
        return "message must have exactly one of text or attachment"
    if "text" in message:
        text = message["text"]
        if not isinstance(text, str) or not 1 <= len(text) <= 2000:
            return "message[text] must be 1-2000 characters"
    else:
        attachment = message["attachment"]
        if not isinstance(attachment, dict):
            return "message[attachment] is not an object"
        if attachment.get("type") == "template":
            if problem := _check_template(attachment.get("payload")):
                return problem
        elif attachment.get("type") in ("image", "audio", "video", "file"):
            if not _valid_url((attachment.get("payload") or {}).get("url")) and not (
                    attachment.get("payload") or {}).get("attachment_id"):
                return "attachment[payload][url] is not a URL"
        else:
            return f"attachment[type] {attachment.get('type')!r} is not supported"
    replies = message.get("quick_replies")
    if replies is not None:
        if not isinstance(replies, list) or not 1 <= len(replies) <= 13:
            return "message[quick_replies] holds 1-13 quick replies"
        for index, reply in enumerate(replies):
            kind = (reply or {}).get("content_type")
            if kind in ("user_phone_number", "user_email"):
                continue
            if kind != "text":
                return f"quick_replies[{index}][content_type] {kind!r} is not supported"
            title, payload = reply.get("title"), reply.get("payload")
            if not isinstance(title, str) or not 1 <= len(title) <= 20:
                return f"quick_replies[{index}][title] must be 1-20 characters"
            if not isinstance(payload, str | int) or not 1 <= len(str(payload)) <= 1000:
                return f"quick_replies[{index}][payload] must be 1-1000 characters"
    return None


@dataclass
class GraphCall:
    path: str
    access_token: str | None
    body: dict[str, Any]
    ok: bool = False
    problem: str | None = None  # why the fake refused it, if it did


class FakeGraphServer(LoopbackServer):
    def __init__(self, version: str = "v21.0",
                 clock: Callable[[], datetime] | None = None) -> None:
        super().__init__()
        self.version = version
        self.clock = clock or (lambda: datetime.now(UTC))
        self.calls: list[GraphCall] = []
        self.unavailable: set[str] = set()  # code 551: this person isn't available
        self.outside: set[str] = set()  # code 10 / 2018278 for untagged messages
        self.errors: deque[tuple[int, dict[str, Any]]] = deque()
        # The nth /me/messages call (from 1) -> (HTTP status, error): a fault on a later part.
        self.send_faults: dict[int, tuple[int, dict[str, Any]]] = {}
        self.last_inbound: dict[str, datetime] = {}
        self.awaiting: set[str] = set()  # people whose message is being answered
        self._ids = itertools.count(1)
        self.page_name = "Example Shop"  # GET /me with the page token
        self.page_id = "1067280970047460"
        self.invalid_tokens: set[str] = set()  # answered code 190 (invalid OAuth token)

    # ---- what the person did (the test tells the fake) ----------------------------------

    def received(self, psid: str, at: datetime | None = None) -> None:
        """The person sent a message (or pressed a button): the window opens and their
        message is being answered until ``settle``."""
        self.last_inbound[psid] = at or self.clock()
        self.awaiting.add(psid)

    def observe(self, webhook: dict[str, Any]) -> None:
        """``received`` for every person's message, postback or referral in a webhook
        body the test is about to post."""
        for entry in webhook.get("entry") or []:
            for item in (entry or {}).get("messaging") or []:
                sender = str((item.get("sender") or {}).get("id", ""))
                message = item.get("message") or {}
                if sender and ("postback" in item or "referral" in item or (
                        "message" in item and not message.get("is_echo"))):
                    self.received(sender)

    def settle(self) -> None:
        """The direct answers were sent: from now on, sends are proactive."""
        self.awaiting.clear()

    # ---- knobs and reading ---------------------------------------------------------------

    def fail_next(self, code: int, subcode: int | None = None, status: int = 400,
                  message: str = "An error occurred", count: int = 1) -> None:
        error: dict[str, Any] = {"message": message, "type": "OAuthException", "code": code,
                                 "fbtrace_id": "AbCdEf"}
        if subcode is not None:
            error["error_subcode"] = subcode
        self.errors.extend([(status, error)] * count)

    def fail_send(self, number: int, code: int, status: int = 400,
                  message: str = "An error occurred") -> None:
        """Answer the ``number``-th Send API call (counted from 1) with a Graph error."""
        self.send_faults[number] = (status, {"message": message, "type": "OAuthException",
                                             "code": code, "fbtrace_id": "AbCdEf"})

    def sent(self, psid: str | None = None) -> list[GraphCall]:
        return [c for c in self.calls if c.ok and c.path.endswith("/me/messages") and (
            psid is None or c.body["recipient"]["id"] == psid)]

    def messages(self, psid: str | None = None) -> list[dict[str, Any]]:
        return [c.body["message"] for c in self.sent(psid) if "message" in c.body]

    def refused(self) -> list[GraphCall]:
        return [c for c in self.calls if c.problem is not None]

    @staticmethod
    def _error(status: int, error: dict[str, Any]) -> web.Response:
        return web.json_response({"error": error}, status=status)

    def _refuse(self, call: GraphCall, problem: str, code: int = 100,
                subcode: int | None = None) -> web.Response:
        call.problem = problem
        error: dict[str, Any] = {"message": f"(#{code}) {problem}", "type": "OAuthException",
                                 "code": code, "fbtrace_id": "AbCdEf"}
        if subcode is not None:
            error["error_subcode"] = subcode
        return self._error(400, error)

    def _window_problem(self, psid: str, body: dict[str, Any]) -> str | None:
        kind, tag = body.get("messaging_type"), body.get("tag")
        if kind == "RESPONSE" and psid not in self.awaiting:
            return ("messaging_type RESPONSE is for a reply to the person's message; a "
                    "message sent on the Page's own initiative is UPDATE or MESSAGE_TAG")
        last = self.last_inbound.get(psid)
        if last is None or "sender_action" in body:
            return None
        age = self.clock() - last
        if kind in ("RESPONSE", "UPDATE") and age > timedelta(hours=24):
            return "This message is sent outside of allowed window."
        if kind == "MESSAGE_TAG" and tag in SEVEN_DAY_TAGS and age > timedelta(days=7):
            return f"This message is sent outside of allowed window ({tag}: 7 days)."
        return None

    async def _messages(self, request: web.Request) -> web.Response:
        body = await request.json()
        call = GraphCall(request.path, request.query.get("access_token"), body)
        self.calls.append(call)
        if self.errors:
            return self._error(*self.errors.popleft())
        if self.send_faults:
            number = sum(c.path.endswith("/me/messages") for c in self.calls)
            if number in self.send_faults:
                return self._error(*self.send_faults.pop(number))
        if problem := check_message(body):
            return self._refuse(call, problem)
        psid = str(body["recipient"]["id"])
        if psid in self.unavailable:
            return self._error(400, {"message": "(#551) This person isn't available right "
                                                "now.", "type": "OAuthException",
                                     "code": 551, "error_subcode": 1545041})
        if psid in self.outside and body.get("messaging_type") != "MESSAGE_TAG":
            return self._refuse(call, "This message is sent outside of allowed window.",
                                code=10, subcode=2018278)
        if problem := self._window_problem(psid, body):
            if problem.startswith("This message"):
                return self._refuse(call, problem, code=10, subcode=2018278)
            return self._refuse(call, problem)
        call.ok = True
        if "sender_action" in body:
            return web.json_response({"recipient_id": psid})
        return web.json_response({"recipient_id": psid,
                                  "message_id": f"m_{next(self._ids)}"})

    async def _subscribed_apps(self, request: web.Request) -> web.Response:
        self.calls.append(GraphCall(request.path, request.query.get("access_token"),
                                    dict(request.query), ok=True))
        return web.json_response({"success": True})

    async def _me(self, request: web.Request) -> web.Response:
        """``GET /me`` with a page token: the Page itself (``fields=id,name``)."""
        token = request.query.get("access_token")
        call = GraphCall(request.path, token, dict(request.query))
        self.calls.append(call)
        if not token or token in self.invalid_tokens:
            return self._error(400 if token else 401, {
                "message": "Invalid OAuth access token - Cannot parse access token",
                "type": "OAuthException", "code": 190, "fbtrace_id": "AbCdEf"})
        call.ok = True
        fields = (request.query.get("fields") or "id,name").split(",")
        page = {"id": self.page_id, "name": self.page_name}
        return web.json_response({k: page[k] for k in fields if k in page} or {"id": self.page_id})

    def routes(self, app: web.Application) -> None:
        app.router.add_get(f"/{self.version}/me", self._me)
        app.router.add_post(f"/{self.version}/me/messages", self._messages)
        app.router.add_post(f"/{self.version}/me/subscribed_apps", self._subscribed_apps)

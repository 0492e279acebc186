"""A fake Viber REST API on 127.0.0.1 (``send_message``, ``broadcast_message``,
``set_webhook``): checks ``X-Viber-Auth-Token``, answers with Viber's ``status`` codes,
records calls, and can act as if users unsubscribed (status 6) or the API is throttling
(12) or failing (5xx). Reusable by ``bench/``.

Messages are checked against the REST API and keyboard docs (``check_message``); a
violation is answered like Viber answers bad input, ``{"status": 3, "status_message":
"badData: <reason>"}``, and nothing is delivered:

- ``sender.name`` 1-28 characters; ``tracking_data`` at most 4096 characters; the whole
  request at most 30 KB; ``text`` 1-7000 characters; a picture's ``text`` at most 768;
- every button (keyboard or rich media): ``ActionBody`` present and non-empty (the docs
  mark it required, for ``none`` too), ``ActionType`` one of the documented ones, a valid
  URL for ``open-url``, ``Text`` at most 250 characters, at least one of ``Text``,
  ``Image``, ``BgMedia``, ``BgColor``, ``Columns`` 1-6 and ``Rows`` 1-2 (keyboards) or
  within the group (rich media);
- rich media: ``ButtonsGroupColumns`` 1-6, ``ButtonsGroupRows`` 1-7, at most 6 groups, and
  each group filled exactly by whole buttons, in order (a card never starts mid-group or
  leaves a hole); no ``share-phone``/``location-picker`` buttons;
- ``min_api_version`` at least the API level of what the message uses: rich media and
  ``Silent`` need 2 (Viber 6.7), ``share-phone``/``location-picker`` need 3, the keyboard's
  ``ButtonsGroupColumns``/``ButtonsGroupRows``/``InputFieldState`` need 4;
- this project's rule on top of the docs: a ``reply`` button that is not ``Silent`` must
  have ``ActionBody`` equal to its visible ``Text``, because Viber posts the ActionBody into
  the chat as the customer's own message (an internal token must never show).
"""

from __future__ import annotations

import itertools
import json
import re
from collections import deque
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from tests.fakes.server import LoopbackServer

ACTION_TYPES = {"reply", "open-url", "location-picker", "share-phone", "none"}
MESSAGE_TYPES = {"text", "picture", "video", "file", "location", "contact", "sticker",
                 "url", "rich_media"}
MAX_REQUEST_BYTES = 30 * 1024
MAX_GROUPS = 6


def _valid_url(value: Any) -> bool:
    if not isinstance(value, str) or not value or len(value) > 2000:
        return False
    parts = urlsplit(value)
    return parts.scheme in ("http", "https", "viber", "tel", "mailto") and bool(
        parts.netloc or parts.scheme in ("viber", "tel", "mailto"))


def _plain(text: str) -> str:
    return re.sub(r"<[^>]*>", "", text).strip()


def check_button(button: Any, *, rich: bool, group: tuple[int, int] = (6, 2),
                 where: str = "button") -> tuple[str | None, int]:
    """The problem with one button (or None) and the API level it needs."""
    if not isinstance(button, dict):
        return f"{where} is not an object", 1
    level = 1
    action = button.get("ActionType", "reply")
    if action not in ACTION_TYPES:
        return f"{where}.ActionType {action!r} is not one of {sorted(ACTION_TYPES)}", level
    body = button.get("ActionBody")
    if not isinstance(body, str) or not body:
        return f"{where}.ActionBody is required (ActionType {action})", level
    if action == "open-url" and not _valid_url(body):
        return f"{where}.ActionBody {body!r} is not a valid URL for open-url", level
    if action in ("share-phone", "location-picker"):
        if rich:
            return f"{where}: {action} is not supported in rich media", level
        level = max(level, 3)
    if not any(button.get(k) for k in ("Text", "Image", "BgMedia", "BgColor")):
        return f"{where} needs one of Text, Image, BgMedia, BgColor", level
    text = button.get("Text")
    if text is not None and (not isinstance(text, str) or len(text) > 250):
        return f"{where}.Text is longer than 250 characters", level
    silent = button.get("Silent", False)
    if not isinstance(silent, bool):
        return f"{where}.Silent is not a boolean", level
    if silent:
        level = max(level, 2)
    if action == "reply" and not silent and body != _plain(text or ""):
        return (f"{where}: reply button without Silent would show its ActionBody {body!r} "
                f"in the chat instead of its label"), level
    columns, rows = button.get("Columns", group[0]), button.get("Rows", 1 if not rich
                                                                  else group[1])
    max_rows = group[1] if rich else 2
    if not isinstance(columns, int) or not 1 <= columns <= group[0]:
        return f"{where}.Columns {columns!r} is not within 1-{group[0]}", level
    if not isinstance(rows, int) or not 1 <= rows <= max_rows:
        return f"{where}.Rows {rows!r} is not within 1-{max_rows}", level
    return None, level


def _layout(buttons: list[dict[str, Any]], columns: int, rows: int) -> str | None:
    """Place buttons in order into groups of ``columns`` x ``rows`` cells, each at the
    first free cell; a button that does not fit there, or a group left with holes, is an
    error (the client would start the next card mid-group)."""
    groups = 0
    free: list[list[bool]] = []
    for index, button in enumerate(buttons):
        width, height = button.get("Columns", columns), button.get("Rows", rows)
        if not free or not any(any(row) for row in free):
            groups += 1
            free = [[True] * columns for _ in range(rows)]
        top, left = next((r, c) for r in range(rows) for c in range(columns) if free[r][c])
        if top + height > rows or left + width > columns or not all(
                free[r][c] for r in range(top, top + height)
                for c in range(left, left + width)):
            return (f"Buttons[{index}] ({width}x{height}) does not fit group {groups} at "
                    f"row {top + 1}, column {left + 1}: each group must be filled exactly")
        for r in range(top, top + height):
            for c in range(left, left + width):
                free[r][c] = False
    if free and any(any(row) for row in free):
        return f"group {groups} is not filled: {sum(map(sum, free))} cells left empty"
    if groups > MAX_GROUPS:
        return f"{groups} groups; rich media holds at most {MAX_GROUPS}"
    return None


def check_keyboard(keyboard: Any) -> tuple[str | None, int]:
    if not isinstance(keyboard, dict) or keyboard.get("Type") != "keyboard":
        return "keyboard.Type must be \"keyboard\"", 1
    buttons = keyboard.get("Buttons")
    if not isinstance(buttons, list) or not buttons:
        return "keyboard.Buttons is required and must not be empty", 1
    level = 4 if any(k in keyboard for k in (
        "ButtonsGroupColumns", "ButtonsGroupRows", "InputFieldState")) else 1
    for index, button in enumerate(buttons):
        problem, needed = check_button(button, rich=False, where=f"keyboard.Buttons[{index}]")
        if problem:
            return problem, level
        level = max(level, needed)
    return None, level


def check_rich_media(rich: Any) -> tuple[str | None, int]:
    if not isinstance(rich, dict) or rich.get("Type") != "rich_media":
        return "rich_media.Type must be \"rich_media\"", 2
    columns, rows = rich.get("ButtonsGroupColumns", 6), rich.get("ButtonsGroupRows", 7)
    if not isinstance(columns, int) or not 1 <= columns <= 6:
        return "rich_media.ButtonsGroupColumns is not within 1-6", 2
    if not isinstance(rows, int) or not 1 <= rows <= 7:
        return "rich_media.ButtonsGroupRows is not within 1-7", 2
    buttons = rich.get("Buttons")
    if not isinstance(buttons, list) or not buttons:
        return "rich_media.Buttons is required and must not be empty", 2
    level = 2
    for index, button in enumerate(buttons):
        problem, needed = check_button(button, rich=True, group=(columns, rows),
                                       where=f"rich_media.Buttons[{index}]")
        if problem:
            return problem, level
        level = max(level, needed)
    return _layout(buttons, columns, rows), level


def check_message(body: dict[str, Any]) -> str | None:
    """Why Viber would refuse (or this project forbids) this message, or None."""
    if len(json.dumps(body).encode()) > MAX_REQUEST_BYTES:
        return "the request is larger than 30 KB"
    sender = body.get("sender")
    if not isinstance(sender, dict) or not isinstance(sender.get("name"), str) or not \
            1 <= len(sender["name"]) <= 28:
        return "sender.name is required, at most 28 characters"
    tracking = body.get("tracking_data")
    if tracking is not None and (not isinstance(tracking, str) or len(tracking) > 4096):
        return "tracking_data is longer than 4096 characters"
    kind = body.get("type")
    if kind not in MESSAGE_TYPES:
        return f"type {kind!r} is not a message type"
    level = 1
    if kind == "text":
        text = body.get("text")
        if not isinstance(text, str) or not text or len(text) > 7000:
            return "text is required, 1-7000 characters"
    elif kind == "picture":
        if not isinstance(body.get("text", ""), str) or len(body.get("text", "")) > 768:
            return "a picture's text is at most 768 characters"
        if not _valid_url(body.get("media")):
            return "picture.media must be a URL"
    elif kind == "rich_media":
        problem, level = check_rich_media(body.get("rich_media"))
        if problem:
            return problem
        alt = body.get("alt_text")
        if alt is not None and (not isinstance(alt, str) or len(alt) > 7000):
            return "alt_text is longer than 7000 characters"
    if "keyboard" in body:
        problem, needed = check_keyboard(body["keyboard"])
        if problem:
            return problem
        level = max(level, needed)
    declared = body.get("min_api_version", 1)
    if not isinstance(declared, int) or declared < 1:
        return "min_api_version must be a positive integer"
    if declared < level:
        return f"min_api_version {declared} is below the API level {level} this message uses"
    return None


@dataclass
class ViberCall:
    method: str
    token: str | None
    body: dict[str, Any]
    ok: bool = False
    problem: str | None = None  # why the fake refused the message, if it did


class FakeViberServer(LoopbackServer):
    url_suffix = "/pa"

    def __init__(self, token: str) -> None:
        super().__init__()
        self.token = token
        self.calls: list[ViberCall] = []
        self.unsubscribed: set[str] = set()
        self.statuses: deque[int] = deque()  # Viber status codes for the next sends
        self.http_failures: deque[int] = deque()
        # The nth message call (send/broadcast, from 1) -> a Viber status (< 100) or an
        # HTTP status (a fault on a later part of a message).
        self.send_faults: dict[int, int] = {}
        self._tokens = itertools.count(5_000_000_000_000_000_000)
        self.account_name = "Example Shop"  # get_account_info
        self.account_uri = "exampleshop"
        self.subscribers: set[str] = set()
        self.webhook_url: str | None = None
        self.event_types: list[str] = []

    def sent(self, user: str | None = None) -> list[dict[str, Any]]:
        """Messages delivered by send_message, optionally to one user."""
        return [c.body for c in self.calls if c.ok and c.method == "send_message" and (
            user is None or c.body.get("receiver") == user)]

    def refused(self) -> list[ViberCall]:
        """Calls answered ``badData`` because the message broke the documented rules."""
        return [c for c in self.calls if c.problem is not None]

    @staticmethod
    def _bad(problem: str) -> web.Response:
        return web.json_response({"status": 3, "status_message": f"badData: {problem}"})

    async def _handle(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        body = await request.json()
        call = ViberCall(method, request.headers.get("X-Viber-Auth-Token"), body)
        self.calls.append(call)
        if self.http_failures:
            return web.Response(status=self.http_failures.popleft(), text="error")
        if method in ("send_message", "broadcast_message") and self.send_faults:
            number = sum(c.method in ("send_message", "broadcast_message")
                         for c in self.calls)
            fault = self.send_faults.pop(number, 0)
            if fault >= 100:
                return web.Response(status=fault, text="error")
            if fault:
                return web.json_response({"status": fault, "status_message": {
                    6: "notSubscribed", 12: "tooManyRequests"}.get(fault, "error")})
        if call.token != self.token:
            return web.json_response({"status": 2, "status_message": "invalidAuthToken"})
        if method == "get_account_info":
            call.ok = True
            return web.json_response({
                "status": 0, "status_message": "ok", "id": "pa:75346594275468546724",
                "name": self.account_name, "uri": self.account_uri, "icon": None,
                "subscribers_count": len(self.subscribers),
                "webhook": self.webhook_url, "event_types": self.event_types})
        if method == "set_webhook":
            self.webhook_url = body.get("url")
            self.event_types = body.get("event_types", [])
            call.ok = True
            return web.json_response({"status": 0, "status_message": "ok",
                                      "event_types": body.get("event_types", [])})
        if method in ("send_message", "broadcast_message"):
            call.problem = check_message(body)
            if call.problem is not None:
                return self._bad(call.problem)
        if self.statuses:
            status = self.statuses.popleft()
            return web.json_response({"status": status, "status_message": {
                6: "notSubscribed", 12: "tooManyRequests"}.get(status, "error")})
        if method == "send_message":
            if not body.get("receiver"):
                return web.json_response({"status": 4, "status_message": "missingData"})
            if body.get("receiver") in self.unsubscribed:
                return web.json_response({"status": 6, "status_message": "notSubscribed"})
            call.ok = True
            return web.json_response({"status": 0, "status_message": "ok",
                                      "message_token": next(self._tokens),
                                      "chat_hostname": "SN-CHAT-05_"})
        if method == "broadcast_message":
            receivers = body.get("broadcast_list") or []
            if not receivers or len(receivers) > 300:
                return self._bad("broadcast_list must hold 1-300 receivers")
            call.ok = True
            failed = [{"receiver": r, "status": 6, "status_message": "Not subscribed"}
                      for r in receivers if r in self.unsubscribed]
            return web.json_response({"status": 0, "status_message": "ok",
                                      "message_token": next(self._tokens),
                                      "failed_list": failed})
        return web.json_response({"status": 1, "status_message": "invalidUrl"}, status=404)

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/pa/{method}", self._handle)

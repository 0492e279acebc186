"""A fake Telegram Bot API server on 127.0.0.1 that the real aiogram ``Bot`` talks to
(``AiohttpSession(api=TelegramAPIServer.from_base(fake.url))``).

It answers like Telegram (``{"ok": true, "result": ...}`` envelopes, Message objects with
increasing ids, error envelopes with ``error_code``/``description``/``parameters``),
records every call, and can be told to rate-limit (429 with ``retry_after``), to act as if
a chat blocked the bot (403), to fail (5xx) or to be slow. Reusable by ``bench/``.

Sends are checked as the Bot API docs say (``check_send``) and refused with
``{"ok": false, "error_code": 400, "description": "Bad Request: ..."}`` like Telegram:
text 1-4096 characters and captions at most 1024 *after entity parsing*, counted in UTF-16
code units; HTML with only the supported tags and every other ``<``/``&`` escaped;
inline buttons with a text and exactly one action, ``callback_data`` of 1-64 bytes
(``BUTTON_DATA_INVALID``), ``url`` an http(s)/tg URL (``BUTTON_URL_INVALID``), at most
100 buttons; reply-keyboard buttons with a text.
"""

from __future__ import annotations

import asyncio
import html
import itertools
import json
import re
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from tests.fakes.server import LoopbackServer

HTML_TAGS = {"b", "strong", "i", "em", "u", "ins", "s", "strike", "del", "span",
             "tg-spoiler", "a", "code", "pre", "blockquote", "tg-emoji"}
BUTTON_ACTIONS = ("url", "callback_data", "login_url", "switch_inline_query",
                  "switch_inline_query_current_chat", "callback_game", "pay", "web_app",
                  "copy_text", "switch_inline_query_chosen_chat")
_TAG = re.compile(r"<(/?)([a-zA-Z][a-zA-Z0-9-]*)((?:\s[^<>]*)?)>")
_ENTITY = re.compile(r"&(lt|gt|amp|quot|#\d+|#x[0-9a-fA-F]+);")


def utf16_length(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def parse_entities(text: str, parse_mode: str | None) -> tuple[str | None, str]:
    """(problem, plain text) for ``text`` under ``parse_mode`` (HTML or none)."""
    if (parse_mode or "").upper() != "HTML":
        return None, text
    plain: list[str] = []
    position = 0
    for match in _TAG.finditer(text):
        plain.append(text[position:match.start()])
        if match.group(2).lower() not in HTML_TAGS:
            offset = len(text[:match.start()].encode())
            return (f"can't parse entities: Unsupported start tag \"{match.group(2)}\" at "
                    f"byte offset {offset}"), ""
        position = match.end()
    plain.append(text[position:])
    raw = "".join(plain)
    if "<" in raw or ">" in raw:
        return "can't parse entities: unescaped \"<\" or \">\" outside a tag", ""
    stray = [m for m in re.finditer("&", raw) if not _ENTITY.match(raw, m.start())]
    if stray:
        return "can't parse entities: unescaped \"&\"", ""
    return None, html.unescape(raw)


def _valid_button_url(url: Any) -> bool:
    if not isinstance(url, str):
        return False
    parts = urlsplit(url)
    return (parts.scheme in ("http", "https") and bool(parts.netloc)) or parts.scheme == "tg"


def check_markup(markup: Any) -> str | None:
    if markup is None or markup == "":
        return None
    if not isinstance(markup, dict):
        return "can't parse reply keyboard markup JSON object"
    if "inline_keyboard" in markup:
        rows = markup["inline_keyboard"]
        if not isinstance(rows, list) or not all(isinstance(r, list) for r in rows):
            return "field \"inline_keyboard\" must be an Array of Array"
        buttons = [b for row in rows for b in row]
        if len(buttons) > 100:
            return "reply markup is too long"
        for button in buttons:
            if not isinstance(button, dict) or not button.get("text"):
                return "text must be non-empty"
            actions = [k for k in BUTTON_ACTIONS if button.get(k) not in (None, False)]
            if len(actions) != 1:
                return "text buttons are unallowed in the inline keyboard" if not actions \
                    else "inline keyboard button must have exactly one action"
            if actions == ["callback_data"] and not (
                    isinstance(button["callback_data"], str)
                    and 1 <= len(button["callback_data"].encode()) <= 64):
                return "BUTTON_DATA_INVALID"
            if actions == ["url"] and not _valid_button_url(button["url"]):
                return "BUTTON_URL_INVALID"
        return None
    if "keyboard" in markup:
        rows = markup["keyboard"]
        if not isinstance(rows, list) or not rows:
            return "keyboard must be non-empty"
        for row in rows:
            for button in row if isinstance(row, list) else [None]:
                text = button.get("text") if isinstance(button, dict) else button
                if not isinstance(text, str) or not text:
                    return "keyboard button text must be non-empty"
        return None
    if markup.get("remove_keyboard") is True or "force_reply" in markup:
        return None
    return "unsupported reply markup"


def check_send(method: str, params: dict[str, Any]) -> str | None:
    """Why the Bot API would answer 400 to this sendMessage/sendPhoto, or None."""
    if params.get("chat_id") in (None, ""):
        return "chat_id is empty"
    mode = params.get("parse_mode")
    if method == "sendMessage":
        problem, plain = parse_entities(str(params.get("text") or ""), mode)
        if problem:
            return problem
        if not plain.strip():
            return "message text is empty"
        if utf16_length(plain) > 4096:
            return "message is too long"
    elif method == "sendPhoto":
        if not params.get("photo"):
            return "there is no photo in the request"
        problem, plain = parse_entities(str(params.get("caption") or ""), mode)
        if problem:
            return problem
        if utf16_length(plain) > 1024:
            return "message caption is too long"
    return check_markup(params.get("reply_markup"))


@dataclass
class Call:
    """One Bot API request as received (nested objects decoded from their JSON strings)."""

    method: str
    params: dict[str, Any]
    at: float = field(default_factory=time.monotonic)
    token: str = ""  # the bot token in the URL (``/bot<token>/<method>``)


def _decode(value: str) -> Any:
    if value[:1] in "{[":
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


class FakeTelegramServer(LoopbackServer):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[Call] = []
        self.too_many_requests = 0  # 429s answered
        self.blocked: set[int] = set()
        self.failures: deque[int] = deque()
        self.send_faults: dict[int, int] = {}  # the nth send (1-based) -> HTTP status
        self.delay = 0.0
        self.webhook: dict[str, Any] | None = None
        self._per_second: float | None = None
        self._retry_after = 1
        self._window: deque[float] = deque()
        self._updates: list[dict[str, Any]] = []
        self._arrived = asyncio.Event()
        self._message_ids = itertools.count(1)
        self._update_ids = itertools.count(1)
        self._released: asyncio.Event | None = None  # set while requests are held
        self.released_at: list[float] = []  # when held requests were let through at once
        self.limited_at: list[float] = []  # when a 429 was answered
        self.revoked: set[str] = set()  # tokens answered 401 Unauthorized (as Telegram does)

    # ---- knobs --------------------------------------------------------------------------

    def rate_limit(self, per_second: float | None, retry_after: int = 1) -> None:
        """Answer 429 (with ``retry_after``) to sends beyond ``per_second`` per bot."""
        self._per_second, self._retry_after = per_second, retry_after

    def hold(self) -> None:
        """Stop answering: requests arriving from now on wait, unprocessed, until
        ``release``. A sender that dies meanwhile has sent nothing (as when a request is
        still on its way when the process is killed)."""
        if self._released is None:
            self._released = asyncio.Event()

    def release(self) -> None:
        if self._released is not None:
            self.released_at.append(time.monotonic())
            self._released.set()
            self._released = None

    def block(self, chat_id: int | str) -> None:
        self.blocked.add(int(chat_id))

    def fail_next(self, count: int = 1, status: int = 502) -> None:
        self.failures.extend([status] * count)

    def fail_send(self, number: int, status: int = 429) -> None:
        """Answer the ``number``-th send (sendMessage / sendPhoto, counted from 1) with
        ``status``: 429 with ``retry_after``, or an error (a fault on a later part)."""
        self.send_faults[number] = status

    def revoke(self, token: str) -> None:
        """Answer every call with ``token`` ``401 Unauthorized`` (a wrong or revoked token)."""
        self.revoked.add(token)

    def restore(self, token: str) -> None:
        self.revoked.discard(token)

    def push_update(self, update: dict[str, Any]) -> dict[str, Any]:
        """Queue an update for ``getUpdates`` (an ``update_id`` is given if missing)."""
        update = {"update_id": next(self._update_ids), **update}
        self._updates.append(update)
        self._arrived.set()
        return update

    # ---- reading what happened -----------------------------------------------------------

    def sent(self, chat_id: int | str | None = None) -> list[Call]:
        """Successful sends (sendMessage / sendPhoto), optionally to one chat."""
        return [c for c in self.calls if c.method in ("sendMessage", "sendPhoto")
                and c.params.get("_ok") and (chat_id is None
                                             or int(c.params["chat_id"]) == int(chat_id))]

    def texts(self, chat_id: int | str | None = None) -> list[str]:
        return [c.params.get("text") or c.params.get("caption") or ""
                for c in self.sent(chat_id)]

    def of(self, method: str) -> list[Call]:
        return [c for c in self.calls if c.method == method]

    def polls(self, token: str | None = None) -> list[Call]:
        """``getUpdates`` calls, optionally those made with one bot token."""
        return [c for c in self.of("getUpdates") if token is None or c.token == token]

    # ---- the server -----------------------------------------------------------------------

    def _error(self, status: int, description: str, **parameters: Any) -> web.Response:
        body: dict[str, Any] = {"ok": False, "error_code": status, "description": description}
        if parameters:
            body["parameters"] = parameters
        return web.json_response(body, status=status)

    def _message(self, chat_id: int, **extra: Any) -> dict[str, Any]:
        return {"message_id": next(self._message_ids), "date": int(time.time()),
                "chat": {"id": chat_id, "type": "private"}, **extra}

    async def _handle(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        if self._released is not None:
            await self._released.wait()
            if request.transport is None or request.transport.is_closing():
                return web.Response(status=499)  # the sender is gone: nothing processed
        if request.content_type == "application/json":
            params = await request.json()
        else:
            form = await request.post()
            params = {k: _decode(v) if isinstance(v, str) else v for k, v in form.items()}
        call = Call(method, dict(params), token=request.match_info["token"])
        self.calls.append(call)
        if call.token in self.revoked:
            return self._error(401, "Unauthorized")
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.failures:
            status = self.failures.popleft()
            return self._error(status, "Internal Server Error" if status >= 500 else "Error")
        if method in ("sendMessage", "sendPhoto") and self.send_faults:
            number = sum(c.method in ("sendMessage", "sendPhoto") for c in self.calls)
            status = self.send_faults.pop(number, 0)
            if status == 429:
                self.too_many_requests += 1
                return self._error(429, f"Too Many Requests: retry after {self._retry_after}",
                                   retry_after=self._retry_after)
            if status:
                return self._error(status, "Internal Server Error" if status >= 500
                                   else "Error")
        handler = getattr(self, f"_m_{method}", None)
        if handler is None:
            return self._error(404, "Not Found: method not found")
        return await handler(call)

    def _rate_limited(self) -> web.Response | None:
        if self._per_second is None:
            return None
        now = time.monotonic()
        while self._window and now - self._window[0] >= 1.0:
            self._window.popleft()
        if len(self._window) >= self._per_second:
            self.too_many_requests += 1
            self.limited_at.append(now)
            return self._error(429, f"Too Many Requests: retry after {self._retry_after}",
                               retry_after=self._retry_after)
        self._window.append(now)
        return None

    async def _send(self, call: Call, **extra: Any) -> web.Response:
        limited = self._rate_limited()
        if limited is not None:
            return limited
        chat_id = int(call.params["chat_id"])
        if chat_id in self.blocked:
            return self._error(403, "Forbidden: bot was blocked by the user")
        if chat_id < 0 and chat_id != -100:
            return self._error(400, "Bad Request: chat not found")
        call.params["_ok"] = True
        return web.json_response({"ok": True, "result": self._message(chat_id, **extra)})

    def refused(self) -> list[Call]:
        """Sends answered 400 because they broke the documented rules."""
        return [c for c in self.calls if c.params.get("_problem")]

    def _check(self, call: Call) -> web.Response | None:
        problem = check_send(call.method, call.params)
        if problem is None:
            return None
        call.params["_problem"] = problem
        return self._error(400, f"Bad Request: {problem}")

    async def _m_sendMessage(self, call: Call) -> web.Response:
        if refused := self._check(call):
            return refused
        return await self._send(call, text=call.params.get("text", ""))

    async def _m_sendPhoto(self, call: Call) -> web.Response:
        if refused := self._check(call):
            return refused
        photo = [{"file_id": "photo-1", "file_unique_id": "u1", "width": 800, "height": 800}]
        extra: dict[str, Any] = {"photo": photo}
        if call.params.get("caption"):
            extra["caption"] = call.params["caption"]
        return await self._send(call, **extra)

    async def _m_answerCallbackQuery(self, call: Call) -> web.Response:
        if not call.params.get("callback_query_id"):
            return self._error(400, "Bad Request: query is too old and response timeout "
                                    "expired or query ID is invalid")
        if len(str(call.params.get("text") or "")) > 200:
            return self._error(400, "Bad Request: MESSAGE_TOO_LONG")
        return web.json_response({"ok": True, "result": True})

    async def _m_setWebhook(self, call: Call) -> web.Response:
        self.webhook = call.params
        return web.json_response({"ok": True, "result": True,
                                  "description": "Webhook was set"})

    async def _m_deleteWebhook(self, call: Call) -> web.Response:
        self.webhook = None
        return web.json_response({"ok": True, "result": True})

    async def _m_getMe(self, call: Call) -> web.Response:
        return web.json_response({"ok": True, "result": {
            "id": 42, "is_bot": True, "first_name": "Example Shop", "username": "ExampleShopBot"}})

    async def _m_getUpdates(self, call: Call) -> web.Response:
        offset = int(call.params.get("offset") or 0)
        if offset:
            self._updates = [u for u in self._updates if u["update_id"] >= offset]
        if not self._updates:  # long poll, briefly
            self._arrived.clear()
            wait = min(float(call.params.get("timeout") or 0), 0.5)
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout=wait)
            except TimeoutError:
                pass
        limit = int(call.params.get("limit") or 100)
        return web.json_response({"ok": True, "result": self._updates[:limit]})

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/bot{token}/{method}", self._handle)

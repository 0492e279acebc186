"""A fake Telegram Bot API server on 127.0.0.1 that the real aiogram ``Bot`` talks to
(``AiohttpSession(api=TelegramAPIServer.from_base(fake.url))``).

It answers like Telegram (``{"ok": true, "result": ...}`` envelopes, Message objects with
increasing ids, error envelopes with ``error_code``/``description``/``parameters``),
records every call, and can be told to rate-limit (429 with ``retry_after``), to act as if
a chat blocked the bot (403), to fail (5xx) or to be slow. Reusable by ``bench/``.
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

from aiohttp import web

from tests.fakes.server import LoopbackServer

TEXT_LIMIT = 4096  # UTF-16 code units of the text after entity parsing
CAPTION_LIMIT = 1024


@dataclass
class Call:
    """One Bot API request as received (nested objects decoded from their JSON strings)."""

    method: str
    params: dict[str, Any]
    at: float = field(default_factory=time.monotonic)


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
        call = Call(method, dict(params))
        self.calls.append(call)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.failures:
            status = self.failures.popleft()
            return self._error(status, "Internal Server Error" if status >= 500 else "Error")
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

    @staticmethod
    def _entity_text(call: Call, key: str) -> str:
        """The text as Telegram measures it: after parsing HTML entities (tags and
        escapes do not count)."""
        text = str(call.params.get(key) or "")
        if str(call.params.get("parse_mode", "")).upper() == "HTML":
            text = html.unescape(re.sub(r"<[^>]*>", "", text))
        return text

    @staticmethod
    def _utf16_units(text: str) -> int:
        return len(text.encode("utf-16-le")) // 2

    async def _m_sendMessage(self, call: Call) -> web.Response:
        text = self._entity_text(call, "text")
        if not text.strip():
            return self._error(400, "Bad Request: message text is empty")
        if self._utf16_units(text) > TEXT_LIMIT:  # Telegram counts UTF-16 code units
            return self._error(400, "Bad Request: message is too long")
        return await self._send(call, text=call.params.get("text", ""))

    async def _m_sendPhoto(self, call: Call) -> web.Response:
        if self._utf16_units(self._entity_text(call, "caption")) > CAPTION_LIMIT:
            return self._error(400, "Bad Request: message caption is too long")
        photo = [{"file_id": "photo-1", "file_unique_id": "u1", "width": 800, "height": 800}]
        extra: dict[str, Any] = {"photo": photo}
        if call.params.get("caption"):
            extra["caption"] = call.params["caption"]
        return await self._send(call, **extra)

    async def _m_answerCallbackQuery(self, call: Call) -> web.Response:
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

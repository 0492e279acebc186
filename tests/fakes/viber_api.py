"""A fake Viber REST API on 127.0.0.1 (``send_message``, ``broadcast_message``,
``set_webhook``): checks ``X-Viber-Auth-Token``, answers with Viber's ``status`` codes,
records calls, and can act as if users unsubscribed (status 6) or the API is throttling
(12) or failing (5xx). Reusable by ``bench/``.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from tests.fakes.server import LoopbackServer


@dataclass
class ViberCall:
    method: str
    token: str | None
    body: dict[str, Any]
    ok: bool = False


class FakeViberServer(LoopbackServer):
    url_suffix = "/pa"

    def __init__(self, token: str) -> None:
        super().__init__()
        self.token = token
        self.calls: list[ViberCall] = []
        self.unsubscribed: set[str] = set()
        self.statuses: deque[int] = deque()  # Viber status codes for the next sends
        self.http_failures: deque[int] = deque()
        self._tokens = itertools.count(5_000_000_000_000_000_000)

    def sent(self, user: str | None = None) -> list[dict[str, Any]]:
        """Messages delivered by send_message, optionally to one user."""
        return [c.body for c in self.calls if c.ok and c.method == "send_message" and (
            user is None or c.body.get("receiver") == user)]

    async def _handle(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        body = await request.json()
        call = ViberCall(method, request.headers.get("X-Viber-Auth-Token"), body)
        self.calls.append(call)
        if self.http_failures:
            return web.Response(status=self.http_failures.popleft(), text="error")
        if call.token != self.token:
            return web.json_response({"status": 2, "status_message": "invalidAuthToken"})
        if method == "set_webhook":
            call.ok = True
            return web.json_response({"status": 0, "status_message": "ok",
                                      "event_types": body.get("event_types", [])})
        if self.statuses:
            status = self.statuses.popleft()
            return web.json_response({"status": status, "status_message": {
                6: "notSubscribed", 12: "tooManyRequests"}.get(status, "error")})
        if method == "send_message":
            if body.get("receiver") in self.unsubscribed:
                return web.json_response({"status": 6, "status_message": "notSubscribed"})
            call.ok = True
            return web.json_response({"status": 0, "status_message": "ok",
                                      "message_token": next(self._tokens),
                                      "chat_hostname": "SN-CHAT-05_"})
        if method == "broadcast_message":
            receivers = body.get("broadcast_list") or []
            if len(receivers) > 300:
                return web.json_response({"status": 3, "status_message": "badData"})
            call.ok = True
            failed = [{"receiver": r, "status": 6, "status_message": "Not subscribed"}
                      for r in receivers if r in self.unsubscribed]
            return web.json_response({"status": 0, "status_message": "ok",
                                      "message_token": next(self._tokens),
                                      "failed_list": failed})
        return web.json_response({"status": 1, "status_message": "invalidUrl"}, status=404)

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/pa/{method}", self._handle)

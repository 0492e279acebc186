"""A fake Graph API (Messenger Send API) on 127.0.0.1: ``POST /{version}/me/messages``
answers like Facebook (``{"recipient_id", "message_id"}`` or an ``{"error": {...}}``
envelope), records every call with its access token, and can act as if a person is
unavailable, outside the 24-hour window, rate-limited or failing. Reusable by ``bench/``.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from tests.fakes.server import LoopbackServer


@dataclass
class GraphCall:
    path: str
    access_token: str | None
    body: dict[str, Any]
    ok: bool = False


class FakeGraphServer(LoopbackServer):
    def __init__(self, version: str = "v21.0") -> None:
        super().__init__()
        self.version = version
        self.calls: list[GraphCall] = []
        self.unavailable: set[str] = set()  # code 551: this person isn't available
        self.outside: set[str] = set()  # code 10 / 2018278 for untagged messages
        self.errors: deque[tuple[int, dict[str, Any]]] = deque()
        self._ids = itertools.count(1)

    def fail_next(self, code: int, subcode: int | None = None, status: int = 400,
                  message: str = "An error occurred", count: int = 1) -> None:
        error: dict[str, Any] = {"message": message, "type": "OAuthException", "code": code,
                                 "fbtrace_id": "AbCdEf"}
        if subcode is not None:
            error["error_subcode"] = subcode
        self.errors.extend([(status, error)] * count)

    def sent(self, psid: str | None = None) -> list[GraphCall]:
        return [c for c in self.calls if c.ok and c.path.endswith("/me/messages") and (
            psid is None or c.body["recipient"]["id"] == psid)]

    def messages(self, psid: str | None = None) -> list[dict[str, Any]]:
        return [c.body["message"] for c in self.sent(psid)]

    @staticmethod
    def _error(status: int, error: dict[str, Any]) -> web.Response:
        return web.json_response({"error": error}, status=status)

    async def _messages(self, request: web.Request) -> web.Response:
        body = await request.json()
        call = GraphCall(request.path, request.query.get("access_token"), body)
        self.calls.append(call)
        if self.errors:
            return self._error(*self.errors.popleft())
        psid = str(body.get("recipient", {}).get("id"))
        if psid in self.unavailable:
            return self._error(400, {"message": "(#551) This person isn't available right "
                                                "now.", "type": "OAuthException",
                                     "code": 551, "error_subcode": 1545041})
        if psid in self.outside and body.get("messaging_type") != "MESSAGE_TAG":
            return self._error(400, {
                "message": "(#10) This message is sent outside of allowed window.",
                "type": "OAuthException", "code": 10, "error_subcode": 2018278})
        call.ok = True
        return web.json_response({"recipient_id": psid,
                                  "message_id": f"m_{next(self._ids)}"})

    async def _subscribed_apps(self, request: web.Request) -> web.Response:
        self.calls.append(GraphCall(request.path, request.query.get("access_token"),
                                    dict(request.query), ok=True))
        return web.json_response({"success": True})

    def routes(self, app: web.Application) -> None:
        app.router.add_post(f"/{self.version}/me/messages", self._messages)
        app.router.add_post(f"/{self.version}/me/subscribed_apps", self._subscribed_apps)
